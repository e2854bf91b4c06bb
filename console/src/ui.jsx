// Pieces every page uses: relative times, loading with live refresh, values, notices,
// confirmation dialogs, empty states.
import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import { api, onEvent } from "./api.js";

// ---- time ---------------------------------------------------------------------------------

const ticks = new Set();
setInterval(() => ticks.forEach((fn) => fn()), 15000);

function useTick() {
  const [, set] = useState(0);
  useEffect(() => {
    const fn = () => set((n) => n + 1);
    ticks.add(fn);
    return () => ticks.delete(fn);
  }, []);
}

export function relative(ms, now = Date.now()) {
  const s = Math.round((now - ms) / 1000);
  const future = s < 0;
  const a = Math.abs(s);
  let text;
  if (a < 10) return "just now";
  if (a < 60) text = `${a} s`;
  else if (a < 3600) text = `${Math.round(a / 60)} min`;
  else if (a < 86400) text = `${Math.round(a / 3600)} h`;
  else if (a < 86400 * 60) text = `${Math.round(a / 86400)} d`;
  else return new Date(ms).toLocaleDateString();
  return future ? `in ${text}` : `${text} ago`;
}

export function exact(ms) {
  const d = new Date(ms);
  return `${d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" })} (${d.toISOString()})`;
}

/** "3 min ago", with the exact time on hover and focus. */
export function Time({ ms, prefix = "" }) {
  useTick();
  if (ms === null || ms === undefined) return <span class="muted">never</span>;
  return (
    <time datetime={new Date(ms).toISOString()} title={exact(ms)} tabIndex={0} class="time">
      {prefix}
      {relative(ms)}
    </time>
  );
}

// ---- loading ------------------------------------------------------------------------------

/**
 * Loads `path` (or runs `load`) now, again when a live event `matches`, and on demand
 * (`reload`). Refreshes that come in bursts are folded into one.
 */
export function useLive(load, matches, deps = []) {
  const [state, setState] = useState({ loading: true, data: null, error: null });
  const loadRef = useRef(load);
  loadRef.current = load;
  const timer = useRef(null);
  const run = useCallback(async () => {
    try {
      const data = typeof loadRef.current === "string" ? await api(loadRef.current) : await loadRef.current();
      setState({ loading: false, data, error: null });
    } catch (e) {
      setState((s) => ({ loading: false, data: s.data, error: e }));
    }
  }, []);
  useEffect(() => {
    setState((s) => ({ ...s, loading: true }));
    run();
  }, deps);
  useEffect(
    () =>
      onEvent((e) => {
        if (e.event === "events_missed" || (matches && matches(e))) {
          clearTimeout(timer.current);
          timer.current = setTimeout(run, 250);
        }
      }),
    deps,
  );
  useEffect(() => () => clearTimeout(timer.current), []);
  return { ...state, reload: run };
}

// ---- values -------------------------------------------------------------------------------

/** A field value as a person reads it. */
export function Value({ v }) {
  if (v === undefined) return <span class="muted">—</span>;
  if (v === null) return <span class="muted">null</span>;
  if (typeof v === "string") return <span class="val-str">{v}</span>;
  if (typeof v === "number" || typeof v === "boolean") return <span class="val-num">{String(v)}</span>;
  return <code class="val-json">{JSON.stringify(v)}</code>;
}

/** The end of an id: UUIDv7 ids made together share their start (the time), peer ids their prefix. */
export function short(id, n = 8) {
  return id ? `…${String(id).slice(-n)}` : "";
}

export function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

// ---- notices ------------------------------------------------------------------------------

const noticeListeners = new Set();
let noticeId = 0;

export function notify(text, kind = "ok") {
  const n = { id: ++noticeId, text, kind };
  noticeListeners.forEach((fn) => fn(n));
}

export function Notices() {
  const [list, setList] = useState([]);
  useEffect(() => {
    const fn = (n) => {
      setList((l) => [...l.slice(-3), n]);
      setTimeout(() => setList((l) => l.filter((x) => x.id !== n.id)), n.kind === "error" ? 9000 : 5000);
    };
    noticeListeners.add(fn);
    return () => noticeListeners.delete(fn);
  }, []);
  return (
    <div class="notices" role="status" aria-live="polite">
      {list.map((n) => (
        <div key={n.id} class={`notice notice-${n.kind}`}>
          {n.text}
        </div>
      ))}
    </div>
  );
}

// ---- dialogs ------------------------------------------------------------------------------

/** A modal confirmation (the native dialog: focus stays inside, Escape cancels). */
export function Confirm({ title, children, confirm, danger, onConfirm, onCancel }) {
  const ref = useRef(null);
  useEffect(() => {
    const d = ref.current;
    if (d && !d.open) d.showModal();
  }, []);
  return (
    <dialog ref={ref} class="dialog" aria-labelledby="dialog-title" onCancel={(e) => (e.preventDefault(), onCancel())}>
      <h2 id="dialog-title">{title}</h2>
      <div class="dialog-body">{children}</div>
      <div class="dialog-actions">
        <button type="button" class="btn" onClick={onCancel} autofocus>
          Cancel
        </button>
        <button type="button" class={`btn ${danger ? "btn-danger" : "btn-primary"}`} onClick={onConfirm}>
          {confirm}
        </button>
      </div>
    </dialog>
  );
}

// ---- states -------------------------------------------------------------------------------

export function Empty({ title, children }) {
  return (
    <div class="empty">
      <p class="empty-title">{title}</p>
      <div class="empty-text">{children}</div>
    </div>
  );
}

export function Problem({ error, retry }) {
  if (!error) return null;
  return (
    <div class="problem" role="alert">
      <strong>Could not load this.</strong> {error.message}{" "}
      {retry && (
        <button class="btn btn-small" onClick={retry}>
          Try again
        </button>
      )}
    </div>
  );
}

export function Loading() {
  return (
    <p class="loading" aria-busy="true">
      Loading…
    </p>
  );
}

/** Runs an action with a busy flag; reports its failure as a notice. */
export function useAction() {
  const [busy, setBusy] = useState(false);
  const run = useCallback(async (fn, done) => {
    setBusy(true);
    try {
      const r = await fn();
      if (done) notify(typeof done === "function" ? done(r) : done);
      return r;
    } catch (e) {
      notify(e.message, "error");
      return undefined;
    } finally {
      setBusy(false);
    }
  }, []);
  return [busy, run];
}
