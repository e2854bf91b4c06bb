// fieldsync's core in WebAssembly, under Node: devices made from real invites (printed by
// the native `fieldsync` binary) edit the same task apart, merge each other's documents and
// agree, with the schema's rules applied by the same Rust code a native node runs.
//
// Needs `./build.sh` (dist/) and the native binary (FIELDSYNC_BIN, default
// target/debug/fieldsync). Run: npm test
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import init, { Device, Doc } from "../dist/fieldsync_wasm.js";

const web = fileURLToPath(new URL("..", import.meta.url));
const root = join(web, "..", "..");
const bin = process.env.FIELDSYNC_BIN ?? join(root, "target", "debug", "fieldsync");

await init({ module_or_path: readFileSync(join(web, "dist", "fieldsync_wasm_bg.wasm")) });

/// A workspace with the examples' schema whose authority is a native node; invites for it.
function workspace(t) {
  const dir = mkdtempSync(join(tmpdir(), "fieldsync-wasm-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const data = join(dir, "hq");
  execFileSync(bin, ["init", "--data", data, "--schema", join(root, "examples", "schema.toml"), "--name", "hq"], { stdio: "ignore" });
  return {
    invite: (user) => execFileSync(bin, ["invite", "--data", data, "--user", user], { encoding: "utf8" }),
  };
}

const view = (device, doc) => JSON.parse(device.view(doc));

test("two devices edit one task apart and agree by the schema's rules", (t) => {
  const ws = workspace(t);
  const ana = Device.fromInvite(ws.invite("ana"));
  const ben = Device.fromInvite(ws.invite("ben"));
  assert.equal(ana.workspaceId(), ben.workspaceId());
  assert.notEqual(ana.peerId(), ben.peerId());
  assert.equal(ana.user(), "ana");

  const now = Date.UTC(2026, 11, 3, 8, 0);
  const mine = ana.create("tasks", JSON.stringify({ title: "Fit the boiler", status: "open", tags: ["gas"] }), now);
  const theirs = Doc.load(mine.id(), mine.save());
  assert.equal(theirs.collection(), "tasks");

  // Apart: ana completes it, ben moves it back to in_progress and tags it.
  ana.update(mine, JSON.stringify({ status: "completed", progress: 100 }), now + 1000);
  ben.update(theirs, JSON.stringify({ status: "in_progress", progress: 40, tags: { $add: ["urgent"] } }), now + 2000);
  assert.equal(view(ana, mine).status, "completed");
  assert.equal(view(ben, theirs).status, "in_progress");

  // Together again, each merges the other's document.
  assert.equal(mine.merge(theirs.save()), true);
  assert.equal(theirs.merge(mine.save()), true);
  assert.equal(mine.merge(theirs.save()), false, "nothing new the second time");
  const a = view(ana, mine);
  const b = view(ben, theirs);
  assert.deepEqual(a, b, "both devices show the same view");
  assert.equal(a.status, "completed", "completed wins (rank rule)");
  assert.equal(a.progress, 100, "the larger progress wins (max rule)");
  assert.deepEqual([...a.tags].sort(), ["gas", "urgent"], "tags merge (set rule)");
  assert.equal(a.title, "Fit the boiler");
  const settled = JSON.parse(ana.conflicts(mine));
  assert.deepEqual(settled.map((c) => [c.field, c.state]).sort(), [["progress", "auto"], ["status", "auto"]],
    "the rules settled both clashes; none is left to a person");
});

test("a schedule clash is kept as a conflict for a person", (t) => {
  const ws = workspace(t);
  const ana = Device.fromInvite(ws.invite("ana"));
  const ben = Device.fromInvite(ws.invite("ben"));
  const now = Date.UTC(2026, 11, 3, 9, 0);
  const shift = ana.create("shifts", JSON.stringify({ start: "08:00" }), now);
  const copy = Doc.load(shift.id(), shift.save());
  ana.update(shift, JSON.stringify({ start: "09:00" }), now + 1);
  ben.update(copy, JSON.stringify({ start: "10:00" }), now + 2);
  shift.merge(copy.save());
  const conflicts = JSON.parse(ana.conflicts(shift));
  assert.equal(conflicts.length, 1, JSON.stringify(conflicts));
  assert.equal(conflicts[0].field, "start");
  assert.equal(conflicts[0].state, "open", "a manual field waits for a person");
  assert.deepEqual([...conflicts[0].values].sort(), ["09:00", "10:00"]);
});

test("a device reopens from its invite and secret key with the same peer id", (t) => {
  const ws = workspace(t);
  const invite = ws.invite("ana");
  const ana = Device.fromInvite(invite);
  const again = Device.restore(invite, ana.secretKey());
  assert.equal(again.peerId(), ana.peerId());
  // Its Hello credential proves this peer id and never carries the invite's secret.
  const credential = ana.credential();
  const secret = JSON.parse(invite).token_secret;
  assert.match(secret, /^[0-9a-f]{64}$/);
  assert.ok(!credential.includes(secret), "the invite's secret stays on the device");
  assert.notEqual(JSON.parse(credential), null, "a device from an invite presents a credential");
  assert.notEqual(Device.restore(invite, again.secretKey()).credential(), Device.fromInvite(invite).credential(),
    "the proof is bound to the peer id");
});

test("bad input is refused with the CLI's message, never a crash", (t) => {
  const ws = workspace(t);
  assert.throws(() => Device.fromInvite("{}"), Error);
  assert.throws(() => Device.fromInvite("not json"), Error);
  const ana = Device.fromInvite(ws.invite("ana"));
  assert.throws(() => Device.restore(ws.invite("ana"), new Uint8Array(3)), /secret key/);
  assert.throws(() => ana.create("nope", "{}", Date.now()), /nope/);
  assert.throws(() => ana.create("tasks", "[1]", Date.now()), Error);
  assert.throws(() => ana.create("tasks", "{}", Number.NaN), /not a time/);
  assert.throws(() => Doc.load("not-an-id", new Uint8Array([1, 2, 3])), /not an entity id/);
  const task = ana.create("tasks", JSON.stringify({ title: "x" }), Date.now());
  assert.throws(() => Doc.load(task.id(), new Uint8Array([1, 2, 3])), Error);
  assert.throws(() => task.merge(new Uint8Array(9 << 20)), /over the .*-byte limit/);
});
