// Benchmark: first sync of N tasks from a real relay (WebSocket on 127.0.0.1) into a new
// browser tab (headless Chromium), IndexedDB durable. Prints the time from Device.open to
// every task listed in the tab, and, beside it, the same first sync into a native device
// (`fieldsync run`, sled) from the same relay.
//
//   node bench/first_sync.mjs [N ...]      # from clients/web/, after ./build.sh and
//                                          # `cargo build --release -p fieldsync-node`
// Defaults: N = 1000 10000; FIELDSYNC_BIN (default ../../target/release/fieldsync).
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, extname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS, harness } from "../../../scripts/e2e/harness.mjs";

const web = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const repo = resolve(web, "../..");
const sizes = process.argv.slice(2).map(Number).filter((n) => n > 0);
const counts = sizes.length ? sizes : [1000, 10000];
const bin = process.env.FIELDSYNC_BIN || join(repo, "target/release/fieldsync");

const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm" };
const server = createServer(async (req, res) => {
  const path = new URL(req.url, "http://x").pathname;
  if (!/^\/(dist|e2e)\/[\w.-]+$/.test(path) && path !== "/") return res.writeHead(404).end();
  try {
    const file = join(web, path === "/" ? "e2e/index.html" : path);
    res.writeHead(200, { "content-type": types[extname(file)] || "application/octet-stream" }).end(await readFile(file));
  } catch {
    res.writeHead(404).end();
  }
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const base = `http://127.0.0.1:${server.address().port}/`;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: CHROMIUM_ARGS,
});

console.log("first sync relay → new device, tasks of 4 fields, durable on both ends");
console.log("      N   browser tab (IndexedDB)   native device (sled)");
for (const n of counts) {
  const work = mkdtempSync(join(tmpdir(), "fieldsync-web-bench-"));
  const h = harness({ bin, work, wait: 600000 });
  try {
    const relayDir = join(work, "relay");
    const schema = join(work, "schema.toml");
    writeFileSync(schema, readFileSync(join(repo, "examples/schema.toml")));
    h.cli(relayDir, ["init", "--schema", schema, "--name", "relay"]);
    const lines = [];
    for (let i = 0; i < n; i++) lines.push(JSON.stringify({ title: `Task ${i}`, status: "open", progress: i % 100, tags: ["bench"] }));
    writeFileSync(join(work, "tasks.jsonl"), lines.join("\n") + "\n");
    h.cli(relayDir, ["import", "tasks", join(work, "tasks.jsonl")]);
    const tabInvite = h.cli(relayDir, ["invite", "--user", "tab"]);
    writeFileSync(join(work, "native.json"), h.cli(relayDir, ["invite", "--user", "native"]));
    const relay = new h.Daemon("relay", relayDir, ["relay", "--listen", "/ip4/127.0.0.1/tcp/0/ws", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"]);
    const ws = (await relay.waitFor("ws", (e) => e.event === "listening" && e.addr.includes("/ws/"))).addr;
    const tcp = (await relay.waitFor("tcp", (e) => e.event === "listening" && /\/tcp\/\d+\/p2p\//.test(e.addr))).addr;
    await relay.event("api");

    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(base);
    await page.waitForFunction(() => window.fieldsync);
    const tabMs = await page.evaluate(async ({ invite, relay, n }) => {
      const started = performance.now();
      const done = new Promise((resolve) => {
        window.fieldsync.Device.open({ name: "bench", invite, relay }).then((device) => {
          window.device = device;
          device.subscribe((e) => e.event === "sync_completed" && resolve());
        });
      });
      await done;
      const listed = (await window.device.list("tasks")).length;
      if (listed !== n) throw new Error(`${listed} tasks in the tab, ${n} expected`);
      return performance.now() - started;
    }, { invite: tabInvite, relay: ws, n });
    await context.close();

    const nativeDir = join(work, "native");
    h.cli(nativeDir, ["init", "--join", join(work, "native.json"), "--name", "native"]);
    const started = Date.now();
    const native = new h.Daemon("native", nativeDir, ["run", "--relay", tcp, "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"]);
    await native.event("sync_completed");
    const nativeMs = Date.now() - started;
    console.log(`${String(n).padStart(7)}   ${(tabMs / 1000).toFixed(2).padStart(8)} s${" ".repeat(16)}${(nativeMs / 1000).toFixed(2).padStart(8)} s (process start included)`);
  } finally {
    await h.stopAll();
    rmSync(work, { recursive: true, force: true });
  }
}
await browser.close();
server.close();
