// Attachments on a browser device (the WebAssembly `Node` the package drives), under Node:
// a file is hashed as a native node hashes it, referenced only once it is held, and
// refused with a clear error on a field under another rule or over the browser's limit.
// (Moving files to and from the relay over WebSocket runs in e2e/browser.e2e.mjs, in
// Chromium: Node has no page context for libp2p's WebSocket transport.)
//
// Needs `./build.sh` (dist/) and the native binary (FIELDSYNC_BIN). Run: npm test
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import init, { Node } from "../dist/fieldsync_wasm.js";

const web = fileURLToPath(new URL("..", import.meta.url));
const root = join(web, "..", "..");
const bin = process.env.FIELDSYNC_BIN ?? join(root, "target", "debug", "fieldsync");

await init({ module_or_path: readFileSync(join(web, "dist", "fieldsync_wasm_bg.wasm")) });

const SCHEMA = `
[collections.jobs.fields]
photos = { rule = "attachments" }
notes  = { rule = "text" }
`;

/** A native authority with a `jobs` collection whose `photos` take attachments. */
function office(t) {
  const dir = mkdtempSync(join(tmpdir(), "fieldsync-attach-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const data = join(dir, "hq");
  writeFileSync(join(dir, "schema.toml"), SCHEMA);
  const run = (...args) => execFileSync(bin, ["--data", data, ...args], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  run("init", "--schema", join(dir, "schema.toml"), "--name", "hq");
  return { dir, run, invite: (user) => run("invite", "--user", user) };
}

const photo = (n) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + (i >> 10)) & 0xff);

test("a file is hashed as the native node hashes it, and referenced once it is held", (t) => {
  const hq = office(t);
  const tab = Node.join(hq.invite("ana"), "ana-tab");
  const job = tab.put("jobs", undefined, JSON.stringify({ notes: "Boiler" }));
  const bytes = photo(70_000);

  // The same bytes attached natively get the same hash.
  const file = join(hq.dir, "photo.jpg");
  writeFileSync(file, bytes);
  const nativeJob = JSON.parse(hq.run("put", "jobs", "{}")).id;
  const native = JSON.parse(hq.run("attach", "jobs", nativeJob, "photos", file));
  const hash = tab.hashBlob(bytes);
  assert.equal(hash, native.hash, "BLAKE3 in the tab is the native hash");
  assert.equal(native.size, bytes.length);

  const reference = { hash, size: bytes.length, mime: "image/jpeg", name: "boiler.jpg" };
  // Not held yet: the reference is refused, as on a native node.
  assert.throws(() => tab.attach("jobs", job, "photos", JSON.stringify(reference)), /not in this node's blob store/);
  tab.holdBlob(hash, bytes.length);
  assert.throws(() => tab.attach("jobs", job, "photos", JSON.stringify({ ...reference, size: 5 })), /5/,
    "a reference with another size than the held file's");
  const out = JSON.parse(tab.attach("jobs", job, "photos", JSON.stringify(reference)));
  assert.deepEqual(out, reference);
  const view = JSON.parse(tab.get("jobs", job));
  assert.deepEqual(view.photos, [reference]);
  const status = JSON.parse(tab.status());
  assert.equal(status.blobs.count, 1);
  assert.equal(status.blobs.bytes, bytes.length);
  assert.equal(status.blobs.max_blob_bytes, 64 << 20);
  // Attaching the same file twice keeps one reference (a set).
  tab.attach("jobs", job, "photos", JSON.stringify(reference));
  assert.equal(JSON.parse(tab.get("jobs", job)).photos.length, 1);
});

test("a field under another rule, a missing entity and a file over the limit are refused", (t) => {
  const hq = office(t);
  const tab = Node.join(hq.invite("ana"), "ana-tab");
  const job = tab.put("jobs", undefined, "{}");
  assert.throws(() => tab.checkAttach("jobs", job, "notes"), /rule text, not attachments/);
  assert.throws(() => tab.checkAttach("jobs", "0190a6d2-0000-7000-8000-000000000000", "photos"), /not found|no entity|does not exist/i);
  assert.throws(() => tab.checkAttach("nope", job, "photos"), /nope/);
  tab.checkAttach("jobs", job, "photos");
  const hash = tab.hashBlob(photo(10));
  tab.holdBlob(hash, 10);
  assert.throws(() => tab.attach("jobs", job, "notes", JSON.stringify({ hash, size: 10, mime: "image/png", name: "x" })),
    /not attachments/);
  assert.throws(() => tab.hashBlob(new Uint8Array((64 << 20) + 1)), /over the browser's limit of 64 MiB/);
  assert.throws(() => tab.checkBlobSize((64 << 20) + 1), /over the browser's limit of 64 MiB/);
  tab.checkBlobSize(64 << 20);
  assert.throws(() => tab.holdBlob("not-a-hash", 1), /invalid blob hash/);
  assert.throws(() => tab.holdBlob(hash, -1), /not the size/);
  assert.throws(() => tab.attach("jobs", job, "photos", "{"), /not JSON/);
});
