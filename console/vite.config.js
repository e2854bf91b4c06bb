// The console's build: `npm run build` writes dist/, which is committed and embedded in the
// fieldsync binary (crates/api/build.rs). Deterministic: file names carry content hashes
// only, no source maps, no timestamps; .ci/run rebuilds and fails if dist/ differs.
import { defineConfig } from "vite";
import preact from "@preact/preset-vite";

export default defineConfig({
  base: "/console/",
  plugins: [preact({ devToolsInProd: false, prefreshEnabled: false })],
  build: {
    outDir: "dist",
    emptyOutDir: true,
    sourcemap: false,
    // One script and one stylesheet: the console is small, and the CSP allows 'self' only.
    cssCodeSplit: false,
    modulePreload: { polyfill: false },
    assetsInlineLimit: 0,
    rollupOptions: {
      output: {
        entryFileNames: "assets/[name]-[hash].js",
        chunkFileNames: "assets/[name]-[hash].js",
        assetFileNames: "assets/[name]-[hash][extname]",
      },
    },
  },
  server: {
    // `npm run dev` against a daemon: FIELDSYNC_API=http://127.0.0.1:7070 npm run dev
    proxy: { "/v1": process.env.FIELDSYNC_API || "http://127.0.0.1:7070" },
  },
});
