// The example PWA (examples/field-pwa) end to end in headless Chromium, against a real
// relay on 127.0.0.1: a worker joins by pasting an invite, works the day's tasks, records a
// payment that waits for the office, settles a shift clash, and the app opens again with
// no network from its service worker's cache and IndexedDB.
//
//   node e2e/pwa.e2e.mjs        # from clients/web/, after ./build.sh and `cargo build`
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS, freePort, harness } from "../../../scripts/e2e/harness.mjs";
import { serve } from "../../../examples/field-pwa/serve.mjs";

const web = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const repo = resolve(web, "../..");
const work = mkdtempSync(join(tmpdir(), "fieldsync-pwa-e2e-"));
const h = harness({ bin: process.env.FIELDSYNC_BIN || join(repo, "target/debug/fieldsync"), work });
const { cli, Daemon, until, step, assert } = h;
const TIMEOUT_S = Number(process.env.E2E_TIMEOUT_S || 300);
let browser = null;
let site = null;

const relayArgs = (ws, tcp) => ["relay", "--listen", `/ip4/127.0.0.1/tcp/${ws}/ws`, "--listen", `/ip4/127.0.0.1/tcp/${tcp}`, "--api", "127.0.0.1:0"];

async function main() {
  site = await serve(0);
  const office = join(work, "office");
  const schema = join(work, "schema.toml");
  writeFileSync(schema, readFileSync(join(repo, "examples/schema.toml")));
  cli(office, ["init", "--schema", schema, "--name", "office"]);
  const tasks = ["Fit the boiler", "Bleed the radiators", "Check the meter"].map(
    (title) => cli(office, ["put", "tasks", JSON.stringify({ title, status: "open", assignee: "ana" })]).id,
  );
  const shift = cli(office, ["put", "shifts", JSON.stringify({ name: "Morning", start: "08:00" })]).id;
  const invite = cli(office, ["invite", "--user", "ana"]);
  const [ws, tcp] = [await freePort(), await freePort()];
  let relay = new Daemon("relay", office, relayArgs(ws, tcp));
  const relayWs = (await relay.waitFor("ws listening", (e) => e.event === "listening" && e.addr.includes("/ws/"))).addr;
  await relay.event("api");

  browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: CHROMIUM_ARGS });
  const context = await browser.newContext();
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(site.url);
  const cards = (list) => page.locator(`#${list} li`);
  const card = (list, id) => page.locator(`#${list} li[data-id="${id}"]`);

  await step("a worker joins by pasting the invite and sees the day's tasks", async () => {
    await page.locator("#invite").fill(invite);
    await page.locator("#relay").fill(relayWs);
    await page.locator("#join-button").click();
    await page.waitForSelector("body[data-ready=true], #join-error:not(:empty)");
    const joinError = await page.locator("#join-error").textContent();
    assert(!joinError, `joining failed: ${joinError}`);
    await until("three task cards", async () => (await cards("tasks").count()) === 3);
    await until("the pill says online", async () => (await page.locator("#sync").getAttribute("data-connected")) === "true");
    assert((await page.locator("#task-count").textContent()) === "3 to do", await page.locator("#task-count").textContent());
  });

  await step("starting and completing a task reaches the office", async () => {
    await card("tasks", tasks[0]).getByRole("button", { name: "Start" }).click();
    await until("in progress at the office", () => cli(office, ["get", "tasks", tasks[0]]).status === "in_progress");
    await card("tasks", tasks[0]).getByRole("button", { name: "Complete" }).click();
    await until("completed at the office", () => cli(office, ["get", "tasks", tasks[0]]).status === "completed");
    await until("2 to do", async () => (await page.locator("#task-count").textContent()) === "2 to do");
  });

  await step("a payment waits for the office, then shows confirmed", async () => {
    await page.locator("#amount").fill("42.50");
    await page.getByRole("button", { name: "Record payment" }).click();
    await until("a pending payment card", async () => (await page.locator("#payments li .status.pending").count()) === 1);
    const proposals = await until("two proposals at the office", () => {
      const all = [cli(office, ["proposals"], { allowFail: true })].flat().filter((p) => p && p.collection === "payments");
      return all.length === 2 && all;
    });
    for (const p of proposals) cli(office, ["accept", p.id]);
    await until("the payment confirmed in the app", async () => (await page.locator("#payments li .status.confirmed").count()) === 1);
  });

  await step("a shift clash made apart is shown to the worker and settled once", async () => {
    await relay.stop();
    await until("the pill says offline", async () => (await page.locator("#sync").getAttribute("data-connected")) === "false");
    await card("shifts", shift).locator("input").fill("09:00");
    await card("shifts", shift).getByRole("button", { name: "Save" }).click();
    await until("one change waiting", async () => (await page.locator("#sync").getAttribute("data-pending")) === "1");
    cli(office, ["put", "shifts", shift, JSON.stringify({ start: "10:00" })]);
    relay = new Daemon("relay", office, relayArgs(ws, tcp));
    await relay.event("api");
    await until("the clash in the app", async () => (await page.locator("#conflicts li").count()) === 1, 60000);
    await page.locator("#conflicts li").getByRole("button", { name: "10:00" }).click();
    await until("settled in the app", async () => await page.locator("#conflicts-section").isHidden());
    await until("settled at the office", () => {
      const open = [cli(office, ["conflicts"], { allowFail: true })].flat().filter((c) => c && c.state === "open");
      return open.length === 0 && cli(office, ["get", "shifts", shift]).start === "10:00";
    });
  });

  await step("with no network the app opens from its cache, with every write", async () => {
    await page.evaluate(() => navigator.serviceWorker.ready);
    await until("the service worker controls the page", () => page.evaluate(() => !!navigator.serviceWorker.controller));
    await context.setOffline(true);
    await relay.stop();
    await page.reload();
    await page.waitForSelector("body[data-ready=true]");
    assert((await cards("tasks").count()) === 3, "three tasks offline");
    assert((await page.locator("#task-count").textContent()) === "2 to do", "the completed task is remembered");
    assert((await page.locator("#payments li .status.confirmed").count()) === 1, "the confirmed payment is remembered");
    assert((await card("shifts", shift).locator("input").inputValue()) === "10:00", "the settled shift");
    assert((await page.locator("#sync").textContent()).startsWith("offline"), await page.locator("#sync").textContent());
    assert(pageErrors.length === 0, `page errors: ${pageErrors.join("; ")}`);
  });
}

async function cleanup() {
  if (browser) await browser.close().catch(() => {});
  browser = null;
  if (site) site.close();
  if (!process.env.E2E_KEEP) rmSync(work, { recursive: true, force: true });
}

await h.run(main, { timeoutS: TIMEOUT_S, cleanup, logs: ["relay"] });
