// The daemon's HTTP API, as the console uses it: every call carries the token the person
// gave once (kept in this browser tab's session storage, never in a cookie), and the live
// event stream is read with fetch (EventSource cannot send the Authorization header).

const KEY = "fieldsync.token";

export function getToken() {
  try {
    return sessionStorage.getItem(KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(token) {
  try {
    if (token) sessionStorage.setItem(KEY, token);
    else sessionStorage.removeItem(KEY);
  } catch {
    /* private mode: the token lives as long as the page */
  }
  memoryToken = token;
}

let memoryToken = getToken();
const unauthorisedListeners = new Set();

/** Called when the API answers 401 (token rotated or wrong): the app asks again. */
export function onUnauthorised(fn) {
  unauthorisedListeners.add(fn);
  return () => unauthorisedListeners.delete(fn);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}, token = memoryToken) {
  const h = { ...extra };
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

/** One API call; the JSON answer, or an ApiError with the API's own message. */
export async function api(path, { method = "GET", body, token } = {}) {
  const init = { method, headers: headers(body === undefined ? {} : { "content-type": "application/json" }, token ?? memoryToken) };
  if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `the node did not answer (${e.message}); is the daemon running?`);
  }
  const text = await res.text();
  let value;
  try {
    value = text ? JSON.parse(text) : null;
  } catch {
    value = text;
  }
  if (!res.ok) {
    const message = (value && value.error) || `${res.status} ${res.statusText}`;
    if (res.status === 401 && token === undefined) unauthorisedListeners.forEach((fn) => fn(message));
    throw new ApiError(res.status, message);
  }
  return value;
}

/** Checks a token: the node answers 401 to a wrong one on every route. */
export async function checkToken(token) {
  return api("/v1/status", { token });
}

export const enc = encodeURIComponent;

// ---- live events ------------------------------------------------------------------------

const eventListeners = new Set();
const stateListeners = new Set();
let liveState = "connecting";
let stream = null;

/** Subscribes to every event of `/v1/events` (parsed JSON); returns the unsubscribe. */
export function onEvent(fn) {
  eventListeners.add(fn);
  return () => eventListeners.delete(fn);
}

/** Subscribes to the stream's state: "connecting", "live", "reconnecting". */
export function onLiveState(fn) {
  stateListeners.add(fn);
  fn(liveState);
  return () => stateListeners.delete(fn);
}

function setLive(state) {
  liveState = state;
  stateListeners.forEach((fn) => fn(state));
}

/** Follows `/v1/events` until stopped, reconnecting with Last-Event-ID after a drop. */
export function startEvents() {
  if (stream) return;
  const controller = new AbortController();
  stream = controller;
  let lastId = "";
  let delay = 500;
  (async () => {
    while (!controller.signal.aborted) {
      try {
        const res = await fetch("/v1/events", { headers: headers(lastId ? { "Last-Event-ID": lastId } : {}), signal: controller.signal });
        if (res.status === 401) {
          unauthorisedListeners.forEach((fn) => fn("the token no longer works"));
          break;
        }
        if (!res.ok || !res.body) throw new Error(`events: ${res.status}`);
        setLive("live");
        delay = 500;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("id:")) lastId = line.slice(3).trim();
              else if (line.startsWith("data:")) data += line.slice(5).trimStart();
            }
            if (!data) continue;
            let event;
            try {
              event = JSON.parse(data);
            } catch {
              continue;
            }
            eventListeners.forEach((fn) => fn(event));
          }
        }
      } catch (e) {
        if (controller.signal.aborted) break;
      }
      setLive("reconnecting");
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
}

export function stopEvents() {
  if (stream) stream.abort();
  stream = null;
  setLive("connecting");
}
