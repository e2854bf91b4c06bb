// A React app on the hooks, for the browser test: open tasks, one watched task and the
// sync state, all read from the tab's device. Bundled by the test with esbuild.
import { createElement as h } from "react";
import { createRoot } from "react-dom/client";
import { Device } from "/dist/fieldsync.js";
import { useEntity, useList, useSyncStatus } from "../src/react.js";

function App({ device, watched }) {
  const open = useList(device, "tasks", { status: "open" });
  const task = useEntity(device, "tasks", watched);
  const status = useSyncStatus(device, { intervalMs: 300 });
  return h(
    "div",
    null,
    h("p", { id: "open-count" }, open.loading ? "…" : String(open.data.length)),
    h("p", { id: "watched" }, task.data ? task.data.status : task.error ? `error: ${task.error.message}` : "…"),
    h("p", { id: "connected" }, status ? String(status.connected) : "…"),
  );
}

window.mountReact = async ({ invite, relay, watched }) => {
  const device = await Device.open({ name: "react-tab", invite, relay });
  window.reactDevice = device;
  createRoot(document.getElementById("root")).render(h(App, { device, watched }));
};
