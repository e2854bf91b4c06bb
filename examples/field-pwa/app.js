// Field day: a field worker's app on fieldsync. Every read and write goes to the device in
// this tab (IndexedDB); fieldsync syncs with the office's relay whenever it can, so the
// app never waits for the network and writes no conflict code: the schema's rules merge
// (completed wins, payments wait for the office), and what no rule can settle (two shift
// times) is shown to the worker.
import { Device } from "./dist/fieldsync.js";

const $ = (id) => document.getElementById(id);
const SETTINGS = "field-day:settings";
let device;
let lastEvent = null;

function el(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);
  node.append(...children);
  return node;
}

async function run(work) {
  $("error").textContent = "";
  try {
    await work();
    await render();
  } catch (e) {
    $("error").textContent = e.message;
  }
}

function action(text, onclick, secondary = false) {
  return el("button", { className: secondary ? "secondary" : "", textContent: text, onclick: () => run(onclick) });
}

async function renderSync() {
  const s = await device.status();
  const pill = $("sync");
  const refused = s.membership && s.membership.state && s.membership.state !== "active";
  if (refused) {
    pill.className = "pill refused";
    pill.textContent = `refused by the office: ${s.membership.reason || s.membership.state}`;
  } else if (s.connected) {
    pill.className = "pill online";
    pill.textContent = s.pending_to_relay ? `online · sending ${s.pending_to_relay}` : "online · up to date";
  } else {
    pill.className = "pill offline";
    pill.textContent = s.pending_to_relay
      ? `offline · ${s.pending_to_relay} change${s.pending_to_relay === 1 ? "" : "s"} waiting`
      : "offline · nothing waiting";
  }
  pill.dataset.connected = String(s.connected);
  pill.dataset.pending = String(s.pending_to_relay);
}

const NEXT = { open: ["Start", "in_progress"], in_progress: ["Complete", "completed"] };

async function renderTasks() {
  const tasks = await device.list("tasks");
  $("task-count").textContent = `${tasks.filter((t) => t.status !== "completed").length} to do`;
  $("tasks").replaceChildren(
    ...tasks.map((t) => {
      const next = NEXT[t.status || "open"];
      return el(
        "li",
        { dataset: { id: t._id } },
        el("span", { className: "title", textContent: t.title || "(untitled)" }),
        el("span", { className: `status ${t.status || "open"}`, textContent: (t.status || "open").replace("_", " ") }),
        next ? action(next[0], () => device.put("tasks", t._id, { status: next[1] })) : "",
      );
    }),
  );
}

async function renderPayments() {
  const payments = await device.list("payments");
  $("payments").replaceChildren(
    ...payments.map((p) => {
      const pending = p._pending && Object.keys(p._pending).length > 0;
      const amount = pending ? p._pending.amount : p.amount;
      return el(
        "li",
        { dataset: { id: p._id } },
        el("span", { className: "title", textContent: `${Number(amount).toFixed(2)}` }),
        el("span", {
          className: `status ${pending ? "pending" : "confirmed"}`,
          textContent: pending ? "waiting for the office" : "confirmed by the office",
        }),
      );
    }),
  );
}

async function renderShifts() {
  const shifts = await device.list("shifts");
  $("shifts").replaceChildren(
    ...shifts.map((s) => {
      const input = el("input", { type: "time", value: s.start || "", ariaLabel: "start" });
      input.style.width = "8rem";
      return el(
        "li",
        { dataset: { id: s._id } },
        el("span", { className: "title", textContent: s.name || "Shift" }),
        input,
        action("Save", () => device.put("shifts", s._id, { start: input.value }), true),
      );
    }),
  );
}

async function renderConflicts() {
  const conflicts = (await device.conflicts()).filter((c) => c.state === "open");
  $("conflicts-section").hidden = conflicts.length === 0;
  $("conflicts").replaceChildren(
    ...conflicts.map((c) =>
      el(
        "li",
        { dataset: { id: c.id } },
        el("span", { textContent: `${c.collection} ${c.field}: two values — keep one` }),
        el("span", {}, ...c.values.map((v) => action(String(v), () => device.resolve(c.id, v), true))),
      ),
    ),
  );
}

async function render() {
  if (!device) return;
  await Promise.all([renderSync(), renderTasks(), renderPayments(), renderShifts(), renderConflicts()]);
}

async function start(settings) {
  device = await Device.open({ name: "field-day", ...settings });
  $("join").hidden = true;
  $("app").hidden = false;
  $("payment-form").onsubmit = (e) => {
    e.preventDefault();
    const amount = Number($("amount").value);
    run(async () => {
      await device.put("payments", null, { amount, status: "collected", collector: (await device.status()).name });
      $("amount").value = "";
    });
  };
  // Entities arrived or sync state moved: redraw (coalesced to one frame).
  device.subscribe((event) => {
    lastEvent = event;
    if (!render.queued) {
      render.queued = true;
      requestAnimationFrame(() => {
        render.queued = false;
        render().catch((e) => ($("error").textContent = e.message));
      });
    }
  });
  setInterval(renderSync, 2000);
  await render();
  document.body.dataset.ready = "true";
}

async function main() {
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("sw.js").catch((e) => console.warn("no offline shell:", e));
  }
  const saved = JSON.parse(localStorage.getItem(SETTINGS) || "null");
  if (saved) {
    try {
      await start({ relay: saved.relay });
      return;
    } catch (e) {
      $("join-error").textContent = e.message;
    }
  }
  $("sync").textContent = "not joined";
  $("join").hidden = false;
  $("join-button").onclick = async () => {
    $("join-error").textContent = "";
    const relay = $("relay").value.trim();
    try {
      await start({ invite: $("invite").value.trim(), relay });
      localStorage.setItem(SETTINGS, JSON.stringify({ relay }));
    } catch (e) {
      $("join-error").textContent = e.message;
    }
  };
}

window.fieldDay = { get device() { return device; }, get lastEvent() { return lastEvent; } };
main();
