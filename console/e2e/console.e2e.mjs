// End-to-end test of the office console in headless Chromium, against a real relay and two
// real device processes on 127.0.0.1 (the fieldsync binary, built beforehand).
//
//   node e2e/console.e2e.mjs                 # from console/, after `cargo build`
//   node e2e/console.e2e.mjs --screenshots   # also writes docs/console/*.png
//
// Environment: FIELDSYNC_BIN (default ../target/debug/fieldsync), CHROMIUM (default
// /usr/bin/chromium), E2E_TIMEOUT_S (default 300). Exits non-zero on any failure; stops
// every process it started, also on failure or timeout; prints "N passed, N failed".
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { harness } from "../../scripts/e2e/harness.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TIMEOUT_S = Number(process.env.E2E_TIMEOUT_S || 300);
const SHOTS = process.argv.includes("--screenshots") ? join(repo, "docs/console") : null;
const WAIT = 30000;

const work = mkdtempSync(join(tmpdir(), "fieldsync-e2e-"));
const h = harness({ bin: process.env.FIELDSYNC_BIN || join(repo, "target/debug/fieldsync"), work, wait: WAIT });
const { cli, Daemon, until, step, assert } = h;
let browser = null;

const LOCAL = ["--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"];

async function startDevice(name, dir, relayAddr) {
  const d = new Daemon(name, dir, ["run", "--relay", relayAddr, ...LOCAL]);
  await d.event("api");
  await d.event("sync_completed");
  return d;
}

async function cleanup() {
  if (browser) await browser.close().catch(() => {});
  browser = null;
  if (!process.env.E2E_KEEP) rmSync(work, { recursive: true, force: true });
}

// ---- checks -------------------------------------------------------------------------------

async function shoot(page, name) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.waitForTimeout(300);
  await page.screenshot({ path: join(SHOTS, `${name}-desktop.png`), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  await page.screenshot({ path: join(SHOTS, `${name}-phone.png`), fullPage: true });
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.waitForTimeout(150);
}

// ---- the flow -----------------------------------------------------------------------------

async function main() {
  const schema = join(work, "schema.toml");
  writeFileSync(schema, readFileSync(join(repo, "examples/schema.toml")));
  const relayDir = join(work, "office");
  const anaDir = join(work, "ana");
  const benDir = join(work, "ben");
  cli(relayDir, ["init", "--schema", schema, "--name", "office"]);
  for (const [user, dir, name] of [
    ["ana", anaDir, "ana-phone"],
    ["ben", benDir, "ben-tablet"],
  ]) {
    writeFileSync(join(work, `${user}.json`), cli(relayDir, ["invite", "--user", user]));
    cli(dir, ["init", "--join", join(work, `${user}.json`), "--name", name]);
  }
  const relay = new Daemon("relay", relayDir, ["relay", ...LOCAL]);
  const relayAddr = (await relay.event("listening")).addr;
  const api = (await relay.event("api")).addr;
  const base = `http://${api}`;
  let ana = await startDevice("ana", anaDir, relayAddr);
  let ben = await startDevice("ben", benDir, relayAddr);
  const anaPeer = cli(anaDir, ["status"]).peer_id;
  const benPeer = cli(benDir, ["status"]).peer_id;
  const token = cli(relayDir, ["api-token"]).token;
  assert(/^[0-9a-f]{64}$/.test(token), `token ${token}`);

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, locale: "en-GB", timezoneId: "UTC" });
  context.setDefaultTimeout(WAIT);
  const page = await context.newPage();
  const foreign = [];
  page.on("request", (r) => !r.url().startsWith(base) && !r.url().startsWith("data:") && !r.url().startsWith("blob:") && foreign.push(r.url()));
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));

  await step("a wrong token gets nothing", async () => {
    const wrong = await context.newPage();
    await wrong.goto(`${base}/console/`);
    await wrong.fill("#token", "0".repeat(64));
    await wrong.click("button[type=submit]");
    await wrong.waitForSelector("#login-error");
    assert((await wrong.textContent("#login-error")).includes("not this node's"), "no wrong-token message");
    assert((await wrong.$("nav.tabs")) === null, "the console opened with a wrong token");
    const answers = await wrong.evaluate(async () => {
      const h = { Authorization: `Bearer ${"0".repeat(64)}` };
      const out = [];
      for (const path of ["/v1/status", "/v1/devices", "/v1/proposals", "/v1/collections/payments", "/v1/events"]) {
        const r = await fetch(path, { headers: h });
        out.push([path, r.status, (await r.json()).error]);
      }
      return out;
    });
    for (const [path, status, error] of answers) assert(status === 401 && error, `${path} with a wrong token: ${status}`);
    await shoot(wrong, "login");
    await wrong.close();
  });

  await step("log in with the token; devices are listed online", async () => {
    await page.goto(`${base}/console/`);
    await page.fill("#token", token);
    await page.press("#token", "Enter");
    await page.waitForSelector("nav.tabs");
    await page.waitForSelector(`tr[data-peer="${anaPeer}"][data-state="online"]`);
    await page.waitForSelector(`tr[data-peer="${benPeer}"][data-state="online"]`);
    const text = await page.textContent("main");
    assert(text.includes("ana-phone") && text.includes("ben-tablet"), "device names missing");
    // Keyboard: the skip link comes first, then the page's controls.
    await page.keyboard.press("Tab");
    assert((await page.evaluate(() => document.activeElement.textContent)).includes("Skip to content"), "the skip link is not first");
  });

  await step("a new invite shows a QR code and waits as pending", async () => {
    await page.fill("#inv-user", "cy");
    await page.click("text=Issue invite");
    await page.waitForSelector("svg.qr path");
    await page.waitForSelector("text=Invite for cy");
    await until("the pending invite", async () => (await page.textContent("main")).includes("Cancel"));
    await shoot(page, "devices");
    await page.click("text=Done");
  });

  // A payment proposed offline: ana's daemon is stopped, the write waits in her store.
  let payment;
  await step("a payment proposed offline appears in the queue once the device syncs", async () => {
    await ana.stop();
    payment = cli(anaDir, ["put", "payments", JSON.stringify({ collector: "ana", amount: 120, status: "collected" })]).id;
    await page.click("a.tab[href='#/proposals']");
    await page.waitForSelector("text=Nothing waiting.");
    ana = await startDevice("ana", anaDir, relayAddr);
    await page.waitForSelector(`tr[data-entity="${payment}"]`);
    await until("both fields proposed", async () => (await page.$$(`tr[data-entity="${payment}"]`)).length === 2);
    const row = await page.textContent(`tr[data-entity="${payment}"] >> nth=0`);
    assert(row.includes("ana"), `row: ${row}`);
    assert((await page.textContent("tbody")).includes("120"), "the proposed amount is not shown");
    await shoot(page, "proposals");
  });

  await step("accepted in the page, the device shows it confirmed", async () => {
    await page.check("text=Select all shown");
    await page.click("text=Accept 2 selected");
    await page.waitForSelector("text=Nothing waiting.");
    await until("ana sees the payment confirmed", async () => {
      const view = cli(anaDir, ["get", "payments", payment]);
      const mine = cli(anaDir, ["proposals", "--mine"]);
      return view.amount === 120 && view.status === "collected" && (Array.isArray(mine) ? mine.length === 0 : !mine) && view;
    });
    const office = cli(relayDir, ["get", "payments", payment]);
    assert(office.amount === 120, `office view ${JSON.stringify(office)}`);
  });

  // A shift both devices changed apart (`start` is a manual field).
  let shift;
  await step("a shift conflict made on two devices shows with both values", async () => {
    shift = cli(relayDir, ["put", "shifts", JSON.stringify({ start: "08:00", worker: "ana" })]).id;
    for (const dir of [anaDir, benDir]) await until(`the shift on ${dir}`, async () => cli(dir, ["get", "shifts", shift], { allowFail: true })?.start === "08:00");
    await ana.stop();
    await ben.stop();
    cli(anaDir, ["put", "shifts", shift, JSON.stringify({ start: "09:00" })]);
    cli(benDir, ["put", "shifts", shift, JSON.stringify({ start: "10:00" })]);
    await page.click("a.tab[href='#/conflicts']");
    await page.waitForSelector("text=No open conflicts.");
    ana = await startDevice("ana", anaDir, relayAddr);
    ben = await startDevice("ben", benDir, relayAddr);
    const card = await page.waitForSelector("article.conflict");
    const text = await card.textContent();
    assert(text.includes("09:00") && text.includes("10:00"), `alternatives: ${text}`);
    await until("who wrote each", async () => {
      const t = await page.textContent("article.conflict");
      return t.includes("by ana") && t.includes("by ben") && t;
    });
    await shoot(page, "conflicts");
  });

  await step("resolved in the page, it disappears everywhere", async () => {
    await page.click("article.conflict >> text=Use this >> nth=0");
    await page.waitForSelector("text=No open conflicts.");
    await page.waitForSelector("tr[data-resolved]");
    const chosen = cli(relayDir, ["get", "shifts", shift]).start;
    assert(["09:00", "10:00"].includes(chosen), `chosen ${chosen}`);
    for (const dir of [relayDir, anaDir, benDir]) {
      await until(`no open conflict on ${dir}`, async () => {
        const open = cli(dir, ["conflicts"]);
        return (Array.isArray(open) ? open.length === 0 : !open) && cli(dir, ["get", "shifts", shift]).start === chosen;
      });
    }
  });

  await step("the data page pages through a collection and shows an entity's history", async () => {
    await page.click("a.tab[href='#/data']");
    await page.waitForSelector("a.tile >> text=shifts");
    await shoot(page, "data");
    await page.click("a.tile >> text=payments");
    await page.waitForSelector(`a[title="${payment}"]`);
    await page.click(`a[title="${payment}"]`);
    await page.waitForSelector("ol.history li");
    const t = await page.textContent("main");
    assert(t.includes("120") && t.includes("collector"), "the entity view misses fields");
    await shoot(page, "entity");
  });

  await step("the health page draws the counters", async () => {
    await page.click("a.tab[href='#/health']");
    await page.waitForSelector("figure.chart");
    assert((await page.$$("figure.chart")).length >= 6, "too few charts");
    const sessions = await page.textContent("figure.chart >> nth=0");
    assert(/Sessions started\s*\d+/.test(sessions), `sessions chart: ${sessions}`);
    await shoot(page, "health");
  });

  await step("a device revoked in the page is cut off and shown revoked", async () => {
    await page.click("a.tab[href='#/devices']");
    await page.click(`button[aria-label="Revoke ben-tablet"]`);
    await page.waitForSelector("dialog[open]");
    await page.click("dialog >> text=Revoke device");
    await page.waitForSelector(`tr[data-peer="${benPeer}"][data-state="revoked"]`);
    const refused = await ben.waitFor("refused event (revoked)", (e) => e.event === "refused" && e.state === "revoked");
    assert(refused.reason.includes("revoked"), JSON.stringify(refused));
    await until("ben's status says revoked", async () => cli(benDir, ["status"]).membership.state === "revoked");
    await until("ben is offline at the office", async () => {
      const d = (await (await fetch(`${base}/v1/devices`)).json()).devices.find((x) => x.peer === benPeer);
      return d && d.revoked && !d.online;
    });
    await page.waitForSelector(`tr[data-peer="${anaPeer}"][data-state="online"]`);
  });

  await step("the page loaded nothing from elsewhere and threw no errors", async () => {
    assert(foreign.length === 0, `requests elsewhere: ${foreign.join(", ")}`);
    assert(pageErrors.length === 0, `page errors: ${pageErrors.join("; ")}`);
  });
}

await h.run(main, { timeoutS: TIMEOUT_S, cleanup, logs: ["relay", "ana", "ben"] });
