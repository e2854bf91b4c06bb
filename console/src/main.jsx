// The office console: log in with the node's API token, then five pages, live.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import "./style.css";
import { api, checkToken, getToken, onLiveState, onUnauthorised, setToken, startEvents, stopEvents } from "./api.js";
import { Notices, useLive } from "./ui.jsx";
import { Devices } from "./pages/Devices.jsx";
import { Proposals } from "./pages/Proposals.jsx";
import { Conflicts } from "./pages/Conflicts.jsx";
import { Data } from "./pages/Data.jsx";
import { Health } from "./pages/Health.jsx";

const PAGES = [
  { id: "devices", label: "Devices", view: Devices },
  { id: "proposals", label: "Proposals", view: Proposals },
  { id: "conflicts", label: "Conflicts", view: Conflicts },
  { id: "data", label: "Data", view: Data },
  { id: "health", label: "Health", view: Health },
];

/** The route: `#/page/rest…`. */
function useRoute() {
  const parse = () => {
    const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
    const page = PAGES.find((p) => p.id === parts[0]) ? parts[0] : "devices";
    return { page, rest: parts.slice(1) };
  };
  const [route, setRoute] = useState(parse);
  useEffect(() => {
    const fn = () => setRoute(parse());
    addEventListener("hashchange", fn);
    return () => removeEventListener("hashchange", fn);
  }, []);
  return route;
}

function Login({ onDone, reason }) {
  const [token, setValue] = useState("");
  const [error, setError] = useState(reason || "");
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    const t = token.trim();
    if (!t) return setError("Enter the token.");
    setBusy(true);
    try {
      const status = await checkToken(t);
      setToken(t);
      onDone(status);
    } catch (err) {
      setError(err.status === 401 ? "That token is not this node's. Check it with `fieldsync api-token` on the node." : err.message);
    } finally {
      setBusy(false);
    }
  };
  return (
    <main class="login" id="main">
      <form class="login-box" onSubmit={submit} aria-describedby="login-help">
        <h1>
          <span class="logo" aria-hidden="true" /> fieldsync console
        </h1>
        <p id="login-help">
          Enter this node's API token. On the machine that runs it: <code>fieldsync --data DIR api-token</code>. The console keeps it in
          this browser tab only, until you log out or close the tab.
        </p>
        <label for="token">API token</label>
        <input
          id="token"
          name="token"
          type="password"
          autocomplete="current-password"
          value={token}
          onInput={(e) => setValue(e.currentTarget.value)}
          aria-invalid={error ? "true" : "false"}
          aria-describedby={error ? "login-error" : undefined}
          autofocus
        />
        {error && (
          <p class="form-error" id="login-error" role="alert">
            {error}
          </p>
        )}
        <button class="btn btn-primary" type="submit" disabled={busy}>
          {busy ? "Checking…" : "Log in"}
        </button>
      </form>
    </main>
  );
}

function LiveBadge() {
  const [state, set] = useState("connecting");
  useEffect(() => onLiveState(set), []);
  const label = { live: "Live", connecting: "Connecting…", reconnecting: "Reconnecting…" }[state];
  return (
    <span class={`live live-${state}`} title={state === "live" ? "Changes show as they happen" : "Waiting for the node's event stream"}>
      <span class="dot" aria-hidden="true" />
      {label}
    </span>
  );
}

function Shell({ status, onLogout }) {
  const route = useRoute();
  const counts = useLive(
    "/v1/status",
    (e) => /^(entity_changed|conflict_|peer_|sync_completed)/.test(e.event),
    [],
  );
  const st = counts.data || status;
  const Page = PAGES.find((p) => p.id === route.page).view;
  const badge = { proposals: st.pending_proposals, conflicts: st.open_conflicts };
  const role = st.authority ? "workspace authority" : "device";
  useEffect(() => {
    document.title = `${PAGES.find((p) => p.id === route.page).label} · ${st.name} · fieldsync`;
  }, [route.page, st.name]);
  return (
    <>
      <a class="skip" href="#main">
        Skip to content
      </a>
      <header class="top">
        <div class="brand">
          <span class="logo" aria-hidden="true" />
          <span>
            <strong>fieldsync</strong> <span class="node-name">{st.name}</span>
            <span class="node-role">{role}</span>
          </span>
        </div>
        <LiveBadge />
        <button class="btn btn-quiet" onClick={onLogout}>
          Log out
        </button>
      </header>
      <nav class="tabs" aria-label="Pages">
        {PAGES.map((p) => (
          <a key={p.id} href={`#/${p.id}`} class="tab" aria-current={route.page === p.id ? "page" : undefined}>
            {p.label}
            {badge[p.id] > 0 && (
              <span class="count" aria-label={`${badge[p.id]} waiting`}>
                {badge[p.id]}
              </span>
            )}
          </a>
        ))}
      </nav>
      {st.membership && st.membership.state !== "active" && (
        <p class="banner banner-danger" role="alert">
          This node is {st.membership.state}
          {st.membership.reason ? ` (${st.membership.reason})` : ""}: it keeps its data but does not sync.
        </p>
      )}
      <main id="main" class="page" tabIndex={-1}>
        <Page status={st} rest={route.rest} />
      </main>
      <Notices />
    </>
  );
}

function App() {
  const [status, setStatus] = useState(null);
  const [reason, setReason] = useState("");
  const [checking, setChecking] = useState(!!getToken());
  useEffect(() => {
    if (getToken()) {
      checkToken(getToken())
        .then(setStatus)
        .catch((e) => {
          setToken("");
          setReason(e.status === 401 ? "The saved token no longer works: it was rotated. Enter the new one." : e.message);
        })
        .finally(() => setChecking(false));
    }
    return onUnauthorised((message) => {
      setToken("");
      stopEvents();
      setStatus(null);
      setReason(`Logged out: ${message}`);
    });
  }, []);
  useEffect(() => {
    if (status) startEvents();
  }, [!!status]);
  if (checking) return <p class="loading">Loading…</p>;
  if (!status) return <Login reason={reason} onDone={(s) => (setReason(""), setStatus(s))} />;
  return (
    <Shell
      status={status}
      onLogout={() => {
        setToken("");
        stopEvents();
        setStatus(null);
        setReason("");
      }}
    />
  );
}

render(<App />, document.getElementById("app"));

