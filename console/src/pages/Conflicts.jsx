// Conflicts: `manual` fields that devices changed apart, with every alternative side by
// side (who wrote each, when); resolve by picking one or entering a value; what was
// resolved before.
import { useState } from "preact/hooks";
import { api, enc } from "../api.js";
import { Empty, Loading, Problem, Time, Value, same, short, useAction, useLive } from "../ui.jsx";

/** Who wrote each alternative, from the entity's history: the newest change that left it. */
function authors(history, field, values) {
  return values.map((v) => {
    for (let i = history.length - 1; i >= 0; i--) {
      const h = history[i];
      const c = (h.changes || []).find((c) => c.field === field && same(c.after, v));
      if (c) return { user: h.user, device: h.device, time_ms: h.time_ms };
    }
    return null;
  });
}

async function loadConflicts() {
  const [all, devices] = await Promise.all([api("/v1/conflicts?all=true"), api("/v1/devices").catch(() => ({ devices: [] }))]);
  const names = Object.fromEntries(devices.devices.map((d) => [d.peer, d.name || d.user]));
  const open = all.filter((c) => c.state === "open");
  const resolved = all.filter((c) => c.state === "resolved").sort((a, b) => b.resolution.time_ms - a.resolution.time_ms);
  const histories = {};
  await Promise.all(
    [...new Set(open.map((c) => `${c.collection}/${c.entity}`))].map(async (key) => {
      const [c, id] = key.split("/");
      histories[key] = await api(`/v1/collections/${enc(c)}/${enc(id)}/history`).catch(() => []);
    }),
  );
  return { open, resolved, histories, names };
}

function parseValue(text) {
  const t = text.trim();
  try {
    return JSON.parse(t);
  } catch {
    return t;
  }
}

function OpenConflict({ c, history, names, onResolved }) {
  const [other, setOther] = useState("");
  const [busy, run] = useAction();
  const who = authors(history, c.field, c.values);
  const resolve = async (value) => {
    const r = await run(() => api(`/v1/conflicts/${enc(c.id)}/resolve`, { method: "POST", body: JSON.stringify(value) }), `${c.field} is now ${JSON.stringify(value)}; every device gets it when it syncs.`);
    if (r) onResolved();
  };
  const submitOther = (e) => {
    e.preventDefault();
    if (other.trim()) resolve(parseValue(other));
  };
  return (
    <article class="card conflict" data-conflict={c.id} aria-labelledby={`c-${c.id}`}>
      <h2 id={`c-${c.id}`} class="conflict-title">
        <a href={`#/data/${enc(c.collection)}/${enc(c.entity)}`}>
          {c.collection} <span class="muted">{short(c.entity)}</span>
        </a>{" "}
        · <code>{c.field}</code>
      </h2>
      <p class="muted small">
        {c.values.length} values were written while the devices were apart. Pick the right one, or enter another.
      </p>
      <div class="alternatives" role="list">
        {c.values.map((v, i) => (
          <div class="alt" role="listitem" key={i}>
            <div class="alt-value">
              <Value v={v} />
            </div>
            <div class="alt-who small">
              {who[i] ? (
                <>
                  by <b>{who[i].user}</b>
                  {names[who[i].device] ? ` on ${names[who[i].device]}` : ""} · <Time ms={who[i].time_ms} />
                </>
              ) : (
                <span class="muted">author unknown</span>
              )}
            </div>
            <button class="btn btn-primary" disabled={busy} onClick={() => resolve(v)} aria-label={`Use ${JSON.stringify(v)} for ${c.field}`}>
              Use this
            </button>
          </div>
        ))}
      </div>
      <form class="other" onSubmit={submitOther}>
        <label for={`other-${c.id}`}>Or another value</label>
        <div class="row">
          <input id={`other-${c.id}`} value={other} onInput={(e) => setOther(e.currentTarget.value)} placeholder='text, number or JSON, e.g. 09:30' />
          <button class="btn" type="submit" disabled={busy || !other.trim()}>
            Resolve with this
          </button>
        </div>
      </form>
    </article>
  );
}

export function Conflicts() {
  const { data, error, loading, reload } = useLive(loadConflicts, (e) => /^conflict_/.test(e.event) || (e.event === "entity_changed" && !e.collection.startsWith("_")));
  return (
    <>
      <div class="page-head">
        <h1>Conflicts</h1>
        <p class="sub">Fields whose rule is <code>manual</code> wait for a person when devices change them apart. Other fields settle by their rule.</p>
      </div>
      <Problem error={error} retry={reload} />
      {loading && !data && <Loading />}
      {data && data.open.length === 0 && (
        <Empty title="No open conflicts.">
          When two devices change the same manual field (a shift's start, say) before they sync, it shows here with both values, for you to decide.
        </Empty>
      )}
      {data && data.open.map((c) => <OpenConflict key={c.id} c={c} history={data.histories[`${c.collection}/${c.entity}`] || []} names={data.names} onResolved={reload} />)}
      {data && (
        <section class="section" aria-labelledby="resolved">
          <h2 id="resolved">Resolved</h2>
          {data.resolved.length === 0 ? (
            <p class="muted">Nothing resolved yet.</p>
          ) : (
            <div class="table-wrap">
              <table class="table cards" aria-label="Resolved conflicts">
                <thead>
                  <tr>
                    <th scope="col">Entity</th>
                    <th scope="col">Field</th>
                    <th scope="col">Alternatives</th>
                    <th scope="col">Chosen</th>
                    <th scope="col">By</th>
                    <th scope="col">When</th>
                  </tr>
                </thead>
                <tbody>
                  {data.resolved.map((c) => (
                    <tr key={c.id} data-resolved={c.id}>
                      <td data-label="Entity">
                        <a href={`#/data/${enc(c.collection)}/${enc(c.entity)}`}>
                          {c.collection} <span class="muted">{short(c.entity)}</span>
                        </a>
                      </td>
                      <td data-label="Field">{c.field}</td>
                      <td data-label="Alternatives">
                        {c.values.map((v, i) => (
                          <span key={i} class="chip">
                            <Value v={v} />
                          </span>
                        ))}
                      </td>
                      <td data-label="Chosen">
                        <Value v={c.resolution.chosen} />
                      </td>
                      <td data-label="By">{c.resolution.user}</td>
                      <td data-label="When">
                        <Time ms={c.resolution.time_ms} />
                      </td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </div>
          )}
        </section>
      )}
    </>
  );
}
