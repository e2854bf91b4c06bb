// React hooks over a fieldsync Device (fieldsync.js). Each reads from the device in the tab
// — never from the network — and reads again when the device says entities changed
// (a local write, or a sync that brought some), so components stay current offline and
// online alike. React is the app's own (a peer dependency of this package).
//
//   const { data: task } = useEntity(device, "tasks", id);
//   const { data: open } = useList(device, "tasks", { status: "open" });
//   const status = useSyncStatus(device);   // { connected, pending_to_relay, membership, … }
import { useEffect, useState } from "react";

/** Events after which what a query read may be stale. */
const STALE = new Set(["changed", "sync_completed"]);

/** Runs `read` now and after every change the device reports; `{ data, error, loading }`. */
function useDeviceRead(device, read, key) {
  const [state, setState] = useState({ data: undefined, error: null, loading: true });
  useEffect(() => {
    if (!device) return undefined;
    let live = true;
    const load = () =>
      read().then(
        (data) => live && setState({ data, error: null, loading: false }),
        (error) => live && setState((s) => ({ data: s.data, error, loading: false })),
      );
    load();
    const stop = device.subscribe((event) => STALE.has(event.event) && load());
    return () => {
      live = false;
      stop();
    };
    // `key` stands for what `read` depends on.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [device, key]);
  return state;
}

/** One entity's view (`data`), or `error` (e.g. not found yet). */
export function useEntity(device, collection, id) {
  return useDeviceRead(device, () => device.get(collection, id), `${collection}/${id}`);
}

/** The views of `collection` matching `where` ({ field: value }). */
export function useList(device, collection, where) {
  return useDeviceRead(device, () => device.list(collection, { where }), `${collection}?${JSON.stringify(where ?? null)}`);
}

/**
 * The device's status (`fieldsync status` with `connected` and `pending_to_relay`), again
 * on every device event and every `intervalMs` (a connection can drop silently).
 */
export function useSyncStatus(device, { intervalMs = 2000 } = {}) {
  const [status, setStatus] = useState(null);
  useEffect(() => {
    if (!device) return undefined;
    let live = true;
    const load = () => device.status().then((s) => live && setStatus(s), () => {});
    load();
    const stop = device.subscribe(load);
    const timer = setInterval(load, intervalMs);
    return () => {
      live = false;
      stop();
      clearInterval(timer);
    };
  }, [device, intervalMs]);
  return status;
}
