// Health: sessions, sync completions and failures, refusals and bytes over the last hours,
// as small charts. The daemon samples the counters /metrics exports every 10 s and keeps
// 6 hours of samples (GET /v1/health); this page reads them every 10 s.
import { useEffect, useState } from "preact/hooks";
import { api } from "../api.js";
import { Loading, Problem, Time, exact } from "../ui.jsx";

const WINDOWS = [
  { id: "15m", label: "15 min", ms: 15 * 60e3 },
  { id: "1h", label: "1 hour", ms: 3600e3 },
  { id: "6h", label: "6 hours", ms: 6 * 3600e3 },
];

const CHARTS = [
  { key: "sync_sessions", title: "Sessions started", kind: "count" },
  { key: "sync_completed", title: "Syncs completed", kind: "count" },
  { key: "sync_failed", title: "Sync failures", kind: "count", bad: true },
  { key: "sessions_refused", title: "Sessions refused", kind: "count", bad: true },
  { key: "bytes_received", title: "Bytes received", kind: "bytes" },
  { key: "bytes_sent", title: "Bytes sent", kind: "bytes" },
  { key: "peers_connected", title: "Peers connected", kind: "gauge" },
  { key: "http_errors", title: "API errors", kind: "count", bad: true },
];

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

/** Per-sample values: differences of a counter (a restart shows as a fresh start), or the gauge. */
function series(samples, key, kind) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const v = kind === "gauge" ? samples[i][key] : Math.max(0, samples[i][key] - samples[i - 1][key]);
    out.push({ at: samples[i].at_ms, v });
  }
  return out;
}

function Chart({ chart, samples, from, to }) {
  const points = series(samples, chart.key, chart.kind).filter((p) => p.at >= from);
  const total = chart.kind === "gauge" ? (samples.length ? samples[samples.length - 1][chart.key] : 0) : points.reduce((a, p) => a + p.v, 0);
  const max = Math.max(1, ...points.map((p) => p.v));
  const fmt = chart.kind === "bytes" ? bytes : String;
  const W = 300;
  const H = 64;
  const x = (t) => ((t - from) / Math.max(1, to - from)) * W;
  const bw = Math.max(1.5, (W / Math.max(1, (to - from) / 10000)) * 0.8);
  const label = `${chart.title}: ${chart.kind === "gauge" ? "now" : "in this window"} ${fmt(total)}, peak ${fmt(max)} per sample`;
  return (
    <figure class={`card chart ${chart.bad && total > 0 ? "chart-bad" : ""}`}>
      <figcaption>
        <span class="chart-title">{chart.title}</span>
        <span class="chart-value">{fmt(total)}</span>
      </figcaption>
      <svg viewBox={`0 0 ${W} ${H}`} preserveAspectRatio="none" role="img" aria-label={label}>
        <line x1="0" y1={H - 0.5} x2={W} y2={H - 0.5} class="axis" />
        {chart.kind === "gauge" ? (
          <>
            <polyline class="line" fill="none" points={points.map((p) => `${x(p.at).toFixed(1)},${(H - 2 - (p.v / max) * (H - 8)).toFixed(1)}`).join(" ")} />
            {points.length < 30 && points.map((p) => <rect key={p.at} class="bar" x={(x(p.at) - 2).toFixed(1)} y={(H - 4 - (p.v / max) * (H - 8)).toFixed(1)} width="4" height="4" />)}
          </>
        ) : (
          points.map((p) =>
            p.v > 0 ? <rect key={p.at} class="bar" x={(x(p.at) - bw).toFixed(1)} width={bw.toFixed(1)} y={(H - 1 - (p.v / max) * (H - 6)).toFixed(1)} height={((p.v / max) * (H - 6)).toFixed(1)} /> : null,
          )
        )}
      </svg>
      <div class="chart-foot muted small">
        <span>{chart.kind === "gauge" ? "now" : "in window"}</span>
        <span>
          peak {fmt(max === 1 && total === 0 ? 0 : max)}
          {chart.kind === "gauge" ? "" : "/10 s"}
        </span>
      </div>
    </figure>
  );
}

export function Health({ status }) {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  const [win, setWin] = useState("15m");
  useEffect(() => {
    let stop = false;
    const load = () =>
      api("/v1/health")
        .then((d) => !stop && (setData(d), setError(null)))
        .catch((e) => !stop && setError(e));
    load();
    const t = setInterval(load, 10000);
    return () => ((stop = true), clearInterval(t));
  }, []);
  const samples = data ? data.samples : [];
  const to = samples.length ? samples[samples.length - 1].at_ms : Date.now();
  const from = to - WINDOWS.find((w) => w.id === win).ms;
  const first = samples[0];
  return (
    <>
      <div class="page-head">
        <h1>Health</h1>
        <p class="sub">
          The counters of <code>/metrics</code>, sampled by the node every 10 s and kept for 6 hours.
          {first && (
            <>
              {" "}
              Samples since <Time ms={first.at_ms} />.
            </>
          )}
        </p>
      </div>
      <div class="filters" role="radiogroup" aria-label="Time window">
        {WINDOWS.map((w) => (
          <label key={w.id} class="radio">
            <input type="radio" name="window" value={w.id} checked={win === w.id} onChange={() => setWin(w.id)} /> {w.label}
          </label>
        ))}
      </div>
      <Problem error={error} />
      {!data && !error && <Loading />}
      {data && samples.length < 3 && <p class="banner">Collecting samples: the charts fill in as the node runs (one sample every 10 s).</p>}
      {data && (
        <div class="charts">
          {CHARTS.map((c) => (
            <Chart key={c.key} chart={c} samples={samples} from={from} to={to} />
          ))}
        </div>
      )}
      <section class="section" aria-labelledby="node-h">
        <h2 id="node-h">This node</h2>
        <dl class="fields fields-2">
          <div>
            <dt>Name</dt>
            <dd>{status.name}</dd>
          </div>
          <div>
            <dt>Peer id</dt>
            <dd class="mono">{status.peer_id}</dd>
          </div>
          <div>
            <dt>Workspace</dt>
            <dd class="mono">{status.workspace}</dd>
          </div>
          <div>
            <dt>Role</dt>
            <dd>{status.authority ? "workspace authority" : "device"}</dd>
          </div>
          <div>
            <dt>Membership</dt>
            <dd>{status.membership ? status.membership.state : "—"}</dd>
          </div>
          <div>
            <dt>Schema version</dt>
            <dd>{status.schema_version}</dd>
          </div>
          <div>
            <dt>Feed position</dt>
            <dd>{status.feed_seq}</dd>
          </div>
          <div>
            <dt>Changes no relay has yet</dt>
            <dd>{status.pending_to_relay ?? "—"}</dd>
          </div>
          <div>
            <dt>Open conflicts</dt>
            <dd>{status.open_conflicts}</dd>
          </div>
          <div>
            <dt>Pending proposals</dt>
            <dd>{status.pending_proposals}</dd>
          </div>
          {data && (
            <div>
              <dt>Last sample</dt>
              <dd title={exact(to)}>
                <Time ms={to} />
              </dd>
            </div>
          )}
        </dl>
      </section>
    </>
  );
}
