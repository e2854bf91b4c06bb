// A browser tab as a fieldsync device, end to end in headless Chromium: a real relay
// (`fieldsync relay`, listening on WebSocket and TCP) and a real native device
// (`fieldsync run`) on 127.0.0.1, and tabs that run clients/web/dist/fieldsync.js.
//
//   node e2e/browser.e2e.mjs        # from clients/web/, after ./build.sh and `cargo build`
//
// Environment: FIELDSYNC_BIN (default ../../target/debug/fieldsync), CHROMIUM (default
// /usr/bin/chromium), E2E_TIMEOUT_S (default 300). Exits non-zero on any failure; stops
// every process it started, also on failure or timeout; prints "N passed, N failed".
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { build } from "esbuild";
import { CHROMIUM_ARGS, freePort, harness } from "../../../scripts/e2e/harness.mjs";

const web = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const repo = resolve(web, "../..");
const work = mkdtempSync(join(tmpdir(), "fieldsync-web-e2e-"));
const h = harness({ bin: process.env.FIELDSYNC_BIN || join(repo, "target/debug/fieldsync"), work });
const { cli, Daemon, until, step, assert } = h;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TIMEOUT_S = Number(process.env.E2E_TIMEOUT_S || 300);
let browser = null;
let server = null;

/** Serves clients/web (dist/ and e2e/) on 127.0.0.1. */
async function serveWeb() {
  const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };
  server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    const file = join(web, path === "/" ? "e2e/index.html" : path);
    if (!file.startsWith(web + "/") || !(path.startsWith("/dist/") || path.startsWith("/e2e/") || path === "/")) {
      res.writeHead(404).end("not found");
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": types[extname(file)] || "application/octet-stream", "cache-control": "no-store" });
      res.end(body);
    } catch {
      res.writeHead(404).end("not found");
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return `http://127.0.0.1:${server.address().port}/`;
}

function startRelay(dir, wsPort, tcpPort) {
  return new Daemon("relay", dir, [
    "relay",
    "--listen", `/ip4/127.0.0.1/tcp/${wsPort}/ws`,
    "--listen", `/ip4/127.0.0.1/tcp/${tcpPort}`,
    "--api", "127.0.0.1:0",
  ]);
}

/** A tab on the test page, with the package loaded. */
async function openTab(context, url) {
  const page = await context.newPage();
  page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  await page.goto(url);
  await page.waitForFunction(() => window.fieldsync);
  return page;
}

/** Opens (or reopens) the tab's device; its events collect in window.events. */
function openDevice(page, options) {
  return page.evaluate(async (options) => {
    window.events = [];
    window.device = await window.fieldsync.Device.open(options);
    window.device.subscribe((e) => window.events.push(e));
    return window.device.peerId;
  }, options);
}

const tabList = (page, collection) => page.evaluate((c) => window.device.list(c), collection);
const tabGet = (page, collection, id) => page.evaluate(([c, i]) => window.device.get(c, i), [collection, id]);
const tabPut = (page, collection, id, patch) =>
  page.evaluate(([c, i, p]) => window.device.put(c, i, p), [collection, id, patch]);
const sortById = (views) => [...views].sort((a, b) => a._id.localeCompare(b._id));

/** Bundles the React test app (React from node_modules; fieldsync.js stays a URL). */
async function bundleReactApp() {
  await build({
    entryPoints: [join(web, "e2e/react-app.js")],
    outfile: join(web, "e2e/build/react-app.js"),
    bundle: true,
    format: "esm",
    external: ["/dist/*"],
    define: { "process.env.NODE_ENV": '"production"' },
    logLevel: "error",
  });
}

async function main() {
  await bundleReactApp();
  const base = await serveWeb();
  const schema = join(work, "schema.toml");
  // The examples' schema, and jobs whose photos are attachments.
  writeFileSync(schema, readFileSync(join(repo, "examples/schema.toml")) + '\n[collections.jobs.fields]\nphotos = { rule = "attachments" }\n');
  const relayDir = join(work, "office");
  const nativeDir = join(work, "ben");
  cli(relayDir, ["init", "--schema", schema, "--name", "office"]);
  // The office's entities before any device joins.
  const seeded = [];
  for (let i = 0; i < 25; i++) {
    seeded.push(cli(relayDir, ["put", "tasks", JSON.stringify({ title: `Task ${i}`, status: "open", tags: ["seed"] })]).id);
  }
  const shared = seeded[0];
  writeFileSync(join(work, "ben.json"), cli(relayDir, ["invite", "--user", "ben"]));
  cli(nativeDir, ["init", "--join", join(work, "ben.json"), "--name", "ben-phone"]);
  const tabInvite = cli(relayDir, ["invite", "--user", "ana"]);

  const wsPort = await freePort();
  const tcpPort = await freePort();
  let relay = startRelay(relayDir, wsPort, tcpPort);
  const relayWs = (await relay.waitFor("ws listening", (e) => e.event === "listening" && e.addr.includes("/ws/"))).addr;
  const relayTcp = (await relay.waitFor("tcp listening", (e) => e.event === "listening" && /\/tcp\/\d+\/p2p\//.test(e.addr))).addr;
  await relay.event("api");
  // Redial a restarted relay within 2 s (the default backoff grows to 30 s).
  const nativeConfig = join(work, "ben.toml");
  writeFileSync(nativeConfig, "[net]\nmax_backoff_ms = 2000\n");
  const native = new Daemon("ben", nativeDir, ["run", "--relay", relayTcp, "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0", "--config", nativeConfig]);
  await native.event("sync_completed");

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: CHROMIUM_ARGS,
  });
  const context = await browser.newContext();
  const tab = await openTab(context, base);
  let tabPeer;

  await step("a tab joins with an invite and receives the relay's entities", async () => {
    tabPeer = await openDevice(tab, { name: "ana", invite: tabInvite, relay: relayWs });
    assert(/^12D3Koo/.test(tabPeer), `peer id ${tabPeer}`);
    await until("25 tasks in the tab", async () => (await tabList(tab, "tasks")).length === 25);
    const status = await tab.evaluate(() => window.device.status());
    assert(status.connected === true, `status ${JSON.stringify(status)}`);
    // The entities can be listed before the session's last acknowledgement ends the
    // exchange, so sync_completed may follow them by a moment.
    await until("sync_completed in the tab's events", async () =>
      (await tab.evaluate(() => window.events.map((e) => e.event))).includes("sync_completed"));
    const members = cli(relayDir, ["members"]);
    assert(JSON.stringify(members).includes(tabPeer), `the relay lists the tab as a member: ${JSON.stringify(members)}`);
  });

  let tabTask;
  await step("a write in the tab reaches the relay and the native device", async () => {
    tabTask = await tabPut(tab, "tasks", null, { title: "Written in a tab", status: "open", tags: ["web"] });
    await until("the tab's task on the native device", () => cli(nativeDir, ["get", "tasks", tabTask], { allowFail: true })?.title === "Written in a tab");
  });

  await step("React hooks show the tab's device and follow what syncs", async () => {
    const page = await context.newPage();
    await page.goto(`${base}e2e/react.html`);
    await page.waitForFunction(() => window.mountReact);
    await page.evaluate((o) => window.mountReact(o), { invite: cli(relayDir, ["invite", "--user", "react"]), relay: relayWs, watched: seeded[1] });
    const text = (id) => page.locator(`#${id}`).textContent();
    const openAtRelay = () => cli(relayDir, ["list", "tasks", "--where", "status=open"]).length;
    await until("useList shows the open tasks", async () => (await text("open-count")) === String(openAtRelay()));
    await until("useSyncStatus shows the connection", async () => (await text("connected")) === "true");
    assert((await text("watched")) === "open", `useEntity: ${await text("watched")}`);
    // A write at the office reaches the tab and the list follows; a write in the tab too.
    cli(relayDir, ["put", "tasks", JSON.stringify({ title: "New at the office", status: "open" })]);
    await until("useList follows a synced write", async () => (await text("open-count")) === String(openAtRelay()));
    await page.evaluate((id) => window.reactDevice.put("tasks", id, { status: "completed" }), seeded[1]);
    await until("useEntity follows a local write", async () => (await text("watched")) === "completed");
    await page.close();
  });

  await step("apart, the tab and the native device edit one task; together, all three agree by the rules", async () => {
    await relay.stop();
    await until("the tab sees the relay gone", async () => (await tab.evaluate(() => window.device.status())).connected === false);
    await tabPut(tab, "tasks", shared, { status: "completed", tags: { $add: ["tab"] } });
    cli(nativeDir, ["put", "tasks", shared, JSON.stringify({ status: "in_progress", title: "Task 0, second floor", tags: { $add: ["native"] } })]);
    relay = startRelay(relayDir, wsPort, tcpPort);
    await relay.event("api");
    const expected = (v) => v && v.status === "completed" && v.title === "Task 0, second floor" && JSON.stringify(v.tags) === JSON.stringify(["native", "seed", "tab"]);
    await until("the merged task everywhere", async () =>
      expected(await tabGet(tab, "tasks", shared)) &&
      expected(cli(nativeDir, ["get", "tasks", shared], { allowFail: true })) &&
      expected(cli(relayDir, ["get", "tasks", shared], { allowFail: true })));
    await until("identical task lists on all three", async () => {
      const lists = [sortById(await tabList(tab, "tasks")), sortById(cli(relayDir, ["list", "tasks"])), sortById(cli(nativeDir, ["list", "tasks"]))];
      return lists.every((l) => JSON.stringify(l) === JSON.stringify(lists[0])) && lists[0].length === 27;
    });
  });

  await step("a payment collected in the tab is pending until the office confirms it", async () => {
    const payment = await tabPut(tab, "payments", null, { amount: 120, status: "collected", collector: "ana" });
    const pending = await tabGet(tab, "payments", payment);
    assert(pending._pending?.amount === 120 && pending.amount === undefined, `pending view ${JSON.stringify(pending)}`);
    // One proposal per authority field (amount, status); the office accepts both.
    const proposals = await until("the proposals at the office", () => {
      const all = [cli(relayDir, ["proposals"], { allowFail: true })].flat().filter((p) => p && p.entity === payment);
      return all.length === 2 && all;
    });
    for (const p of proposals) cli(relayDir, ["accept", p.id]);
    const confirmed = (v) => v && v.amount === 120 && v.status === "collected" && !v._pending;
    await until("the confirmed payment at the office", () => confirmed(cli(relayDir, ["get", "payments", payment], { allowFail: true })));
    await until("the confirmed payment in the tab", async () => {
      const v = await tabGet(tab, "payments", payment);
      return confirmed(v);
    });
  });

  await step("a reload with the relay down keeps every write", async () => {
    await relay.stop();
    const before = sortById(await tabList(tab, "tasks"));
    const offlineTask = await tabPut(tab, "tasks", null, { title: "Written offline", status: "open" });
    await tab.reload();
    await tab.waitForFunction(() => window.fieldsync);
    const again = await openDevice(tab, { name: "ana", relay: relayWs });
    assert(again === tabPeer, `same device after the reload: ${again} vs ${tabPeer}`);
    const after = await tabList(tab, "tasks");
    assert(after.length === before.length + 1, `${after.length} tasks after the reload, ${before.length + 1} expected`);
    assert((await tabGet(tab, "tasks", offlineTask)).title === "Written offline", "the offline write is there");
    relay = startRelay(relayDir, wsPort, tcpPort);
    await relay.event("api");
    await until("the offline write at the relay", () => cli(relayDir, ["get", "tasks", offlineTask], { allowFail: true })?.title === "Written offline");
  });

  await step("a delete in the tab reaches the relay", async () => {
    const doomed = await tabPut(tab, "tasks", null, { title: "Entered by mistake" });
    await until("the task at the relay", () => cli(relayDir, ["get", "tasks", doomed], { allowFail: true })?.title === "Entered by mistake");
    await tab.evaluate((id) => window.device.delete("tasks", id), doomed);
    await until("deleted at the relay", () => cli(relayDir, ["get", "tasks", doomed], { allowFail: true })?._deleted === true);
    assert((await tabGet(tab, "tasks", doomed))._deleted === true, "deleted in the tab");
    const listed = (await tabList(tab, "tasks")).map((t) => t._id);
    assert(!listed.includes(doomed), "a deleted task is not listed");
  });

  await step("a photo attached in the tab reaches the relay, the native device and a second tab", async () => {
    const job = cli(relayDir, ["put", "jobs", JSON.stringify({})]).id;
    await until("the job in the tab", async () => (await tabGet(tab, "jobs", job).catch(() => null))?._id === job);
    // 300 KiB of a pattern both sides can make again.
    const SIZE = 300 * 1024;
    const pattern = (n) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + (i >> 10)) & 0xff);
    const ref = await tab.evaluate(async ([job, n]) => {
      const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 31 + (i >> 10)) & 0xff);
      return window.device.attach("jobs", job, "photos", new Blob([bytes], { type: "image/jpeg" }), { name: "boiler.jpg" });
    }, [job, SIZE]);
    assert(/^[0-9a-f]{64}$/.test(ref.hash) && ref.size === SIZE && ref.mime === "image/jpeg" && ref.name === "boiler.jpg",
      `reference ${JSON.stringify(ref)}`);
    const shown = (await tabGet(tab, "jobs", job)).photos;
    assert(shown?.length === 1 && ["hash", "size", "mime", "name"].every((k) => shown[0][k] === ref[k]), `the tab shows the reference: ${JSON.stringify(shown)}`);
    // The relay pulls the file from the tab by itself once the reference syncs.
    await relay.waitFor("the relay fetching the tab's file", (e) => e.event === "blob_fetched" && e.hash === ref.hash);
    const atRelay = join(work, "at-relay.jpg");
    cli(relayDir, ["blob", "get", ref.hash, "--out", atRelay]);
    assert(Buffer.compare(readFileSync(atRelay), Buffer.from(pattern(SIZE))) === 0, "the relay holds the same bytes");
    // The native device fetches it through the relay.
    const atBen = join(work, "at-ben.jpg");
    await until("the reference on the native device", () => cli(nativeDir, ["get", "jobs", job], { allowFail: true })?.photos?.length === 1);
    cli(nativeDir, ["blob", "get", ref.hash, "--out", atBen]);
    assert(Buffer.compare(readFileSync(atBen), Buffer.from(pattern(SIZE))) === 0, "the native device got the same bytes");
    // A second tab (another member) gets it by hash from the relay, verified, and keeps it.
    const second = await openTab(await browser.newContext(), base);
    await openDevice(second, { name: "cara", invite: cli(relayDir, ["invite", "--user", "cara"]), relay: relayWs });
    await until("the job in the second tab", async () => (await tabGet(second, "jobs", job).catch(() => null))?.photos?.length === 1);
    const got = await second.evaluate(async ([hash, n]) => {
      const bytes = await window.device.blob(hash);
      const expected = Uint8Array.from({ length: n }, (_, i) => (i * 31 + (i >> 10)) & 0xff);
      const same = bytes.length === expected.length && bytes.every((b, i) => b === expected[i]);
      const status = await window.device.status();
      return { same, length: bytes.length, held: status.blobs.count };
    }, [ref.hash, SIZE]);
    assert(got.same && got.length === SIZE && got.held === 1, `second tab: ${JSON.stringify(got)}`);
    // A hash no entity references: the relay refuses it. Not connected: said so.
    const errors = await second.evaluate(async (hash) => {
      const out = {};
      try {
        await window.device.blob("ab".repeat(32));
      } catch (e) {
        out.unknown = { code: e.code, message: e.message };
      }
      await window.device.close();
      window.device = await window.fieldsync.Device.open({ name: "cara" });
      out.offline = await window.device.blob(hash).then((b) => b.length, (e) => e.code);
      try {
        await window.device.blob("cd".repeat(32));
      } catch (e) {
        out.disconnected = e.code;
      }
      return out;
    }, ref.hash);
    assert(errors.unknown?.code === "REFUSED" && errors.unknown.message.includes("no entity"), `unknown hash: ${JSON.stringify(errors)}`);
    assert(errors.offline === SIZE, `a fetched file is kept: ${JSON.stringify(errors)}`);
    assert(errors.disconnected === "NOT_CONNECTED", `offline: ${JSON.stringify(errors)}`);
    // A field under another rule is refused before anything is stored.
    const refused = await tab.evaluate(async (job) =>
      window.device.attach("jobs", job, "notes", new Uint8Array([1, 2, 3])).then(() => null, (e) => e.message), job);
    assert(refused?.includes("not attachments"), `notes: ${refused}`);
    const tooBig = await tab.evaluate(async (job) =>
      window.device.attach("jobs", job, "photos", new Blob([new Uint8Array((64 << 20) + 1)])).then(() => null, (e) => e.message), job);
    assert(tooBig?.includes("over the browser's limit of 64 MiB"), `a 64 MiB + 1 file: ${tooBig}`);
    await second.close();
  });

  await step("a file referenced but held by no peer is NOT_HERE", async () => {
    // A device attaches offline, loses the file (its storage cleared), then syncs.
    const dora = await openTab(await browser.newContext(), base);
    const invite = cli(relayDir, ["invite", "--user", "dora"]);
    const { job, hash } = await dora.evaluate(async (invite) => {
      const d = await window.fieldsync.Device.open({ name: "dora", invite });
      const job = await d.put("jobs", null, {});
      const ref = await d.attach("jobs", job, "photos", new Uint8Array([9, 8, 7, 6]));
      await d.close();
      const db = await new Promise((ok, fail) => {
        const r = indexedDB.open("fieldsync:dora", 2);
        r.onsuccess = () => ok(r.result);
        r.onerror = () => fail(r.error);
      });
      await new Promise((ok, fail) => {
        const tx = db.transaction(["blobs", "blob_sizes"], "readwrite");
        tx.objectStore("blobs").delete(ref.hash);
        tx.objectStore("blob_sizes").delete(ref.hash);
        tx.oncomplete = ok;
        tx.onerror = () => fail(tx.error);
      });
      db.close();
      return { job, hash: ref.hash };
    }, invite);
    await openDevice(dora, { name: "dora", relay: relayWs });
    await until("dora's job at the relay", () => cli(relayDir, ["get", "jobs", job], { allowFail: true })?.photos?.length === 1);
    const answer = await dora.evaluate((hash) => window.device.blob(hash).then(() => "got it", (e) => e.code), hash);
    assert(answer === "NOT_HERE", `asked for a file nobody holds: ${answer}`);
    await dora.close();
  });

  await step("a stranger tab (an invite of another workspace) is refused and receives nothing", async () => {
    const otherDir = join(work, "other");
    cli(otherDir, ["init", "--schema", schema, "--name", "elsewhere"]);
    const foreign = cli(otherDir, ["invite", "--user", "mallory"]);
    const stranger = await openTab(await browser.newContext(), base);
    await openDevice(stranger, { name: "mallory", invite: foreign, relay: relayWs });
    const refusal = await until("the relay's refusal in the stranger tab", async () =>
      (await stranger.evaluate(() => window.events)).find((e) => e.event === "refused"));
    assert(refusal.state === "refused" && refusal.reason.includes("workspace"), `refusal ${JSON.stringify(refusal)}`);
    const got = await stranger.evaluate(() => window.device.list("tasks"));
    assert(got.length === 0, `the stranger received ${got.length} tasks`);
    const members = JSON.stringify(cli(relayDir, ["members"]));
    const strangerPeer = await stranger.evaluate(() => window.device.peerId);
    assert(!members.includes(strangerPeer), "the stranger is no member");
  });

  await step("bad input in the tab throws with the reason", async () => {
    const errors = await tab.evaluate(async () => {
      const out = [];
      for (const f of [
        () => window.device.put("nope", null, {}),
        () => window.device.get("tasks", "not-an-id"),
        () => window.device.put("tasks", null, "[1]"),
        () => window.fieldsync.Device.open({ name: "never-joined" }),
        () => window.fieldsync.Device.open({ name: "x", invite: "{}", relay: "/ip4/127.0.0.1/tcp/1" }),
      ]) {
        try {
          await f();
          out.push(null);
        } catch (e) {
          out.push(String(e.message || e));
        }
      }
      return out;
    });
    assert(errors.every((e) => e && e.length > 5), `every call threw: ${JSON.stringify(errors)}`);
    assert(errors[0].includes("nope"), errors[0]);
    assert(errors[3].includes("invite"), errors[3]);
  });
}

async function cleanup() {
  if (browser) await browser.close().catch(() => {});
  browser = null;
  if (server) server.close();
  if (!process.env.E2E_KEEP) rmSync(work, { recursive: true, force: true });
}

await h.run(main, { timeoutS: TIMEOUT_S, cleanup, logs: ["relay", "ben"] });
