// Serves the example on 127.0.0.1 (the app from here, /dist/ from clients/web/dist).
//   node examples/field-pwa/serve.mjs [PORT]      # after clients/web/build.sh
// Prints the URL. A service worker needs a secure context: 127.0.0.1 is one; elsewhere
// serve it over https.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { dirname, extname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = resolve(here, "../../clients/web/dist");
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript",
  ".css": "text/css",
  ".wasm": "application/wasm",
  ".svg": "image/svg+xml",
  ".webmanifest": "application/manifest+json",
};

/** Starts the server on `port` (0: any); resolves with its URL. */
export async function serve(port = 0) {
  const server = createServer(async (req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    const name = path === "/" ? "index.html" : path.slice(1);
    // Only plain names: no "..", no hidden files.
    if (!/^(dist\/)?[\w-]+(\.[\w-]+)+$/.test(name)) return res.writeHead(404).end("not found");
    const file = name.startsWith("dist/") ? join(dist, name.slice(5)) : join(here, name);
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": TYPES[extname(file)] || "application/octet-stream" }).end(body);
    } catch {
      res.writeHead(404).end("not found");
    }
  });
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${server.address().port}/`, close: () => server.close() };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { url } = await serve(Number(process.argv[2] || 8090));
  console.log(`Field day on ${url} (Ctrl-C stops)`);
}
