// Proposals: what devices proposed for authority fields (payments, inventory…), waiting for
// the office. Filter by collection, user and age; accept or reject one or many; the
// proposed value beside the confirmed one.
import { useMemo, useState } from "preact/hooks";
import { api, enc } from "../api.js";
import { Empty, Loading, Problem, Time, Value, notify, short, useAction, useLive } from "../ui.jsx";

const AGES = [
  { id: "any", label: "Any age", ms: 0 },
  { id: "1h", label: "Older than 1 hour", ms: 3600e3 },
  { id: "1d", label: "Older than 1 day", ms: 86400e3 },
  { id: "1w", label: "Older than 1 week", ms: 7 * 86400e3 },
];

async function loadQueue(authority) {
  const proposals = await api(authority ? "/v1/proposals" : "/v1/proposals?mine=true");
  // The confirmed value of each entity, read once per entity.
  const ids = [...new Set(proposals.map((p) => `${p.collection}/${p.entity}`))];
  const views = {};
  await Promise.all(
    ids.map(async (key) => {
      const [c, id] = key.split("/");
      try {
        views[key] = await api(`/v1/collections/${enc(c)}/${enc(id)}?include_deleted=true`);
      } catch {
        views[key] = null;
      }
    }),
  );
  return { proposals, views };
}

export function Proposals({ status }) {
  const authority = status.authority;
  const { data, error, loading, reload } = useLive(() => loadQueue(authority), (e) => e.event === "entity_changed" && !e.collection.startsWith("_"), [authority]);
  const [collection, setCollection] = useState("");
  const [user, setUser] = useState("");
  const [age, setAge] = useState("any");
  const [selected, setSelected] = useState(() => new Set());
  const [busy, run] = useAction();

  const all = data ? data.proposals : [];
  const collections = useMemo(() => [...new Set(all.map((p) => p.collection))].sort(), [all]);
  const users = useMemo(() => [...new Set(all.map((p) => p.user))].sort(), [all]);
  const minAge = AGES.find((a) => a.id === age).ms;
  const now = Date.now();
  const shown = all
    .filter((p) => (!collection || p.collection === collection) && (!user || p.user === user) && now - p.time_ms >= minAge)
    .sort((a, b) => a.time_ms - b.time_ms);
  const chosen = shown.filter((p) => selected.has(p.id));

  const toggle = (id) =>
    setSelected((s) => {
      const n = new Set(s);
      n.has(id) ? n.delete(id) : n.add(id);
      return n;
    });
  const allChosen = shown.length > 0 && chosen.length === shown.length;
  const toggleAll = () => setSelected(allChosen ? new Set() : new Set(shown.map((p) => p.id)));

  const settle = async (verb, list) => {
    const ids = list.map((p) => p.id);
    const results = await run(() => api(`/v1/proposals/${verb}`, { method: "POST", body: { ids } }));
    if (results) {
      const failed = results.filter((r) => r.error);
      const done = results.length - failed.length;
      const word = verb === "accept" ? "accepted" : "rejected";
      notify(failed.length ? `${done} ${word}; ${failed.length} could not be: ${failed[0].error}` : `${done} proposal${done === 1 ? "" : "s"} ${word}.`, failed.length ? "error" : "ok");
    }
    setSelected(new Set());
    reload();
  };

  return (
    <>
      <div class="page-head">
        <h1>Proposals</h1>
        <p class="sub">
          {authority
            ? "Values devices proposed for fields only the office confirms. Accepting confirms the value everywhere; rejecting keeps the confirmed one."
            : "Only the workspace authority settles proposals. These are this node's own, still waiting."}
        </p>
      </div>
      <Problem error={error} retry={reload} />
      {loading && !data && <Loading />}
      {data && (
        <div class="filters" role="group" aria-label="Filters">
          <label>
            Collection
            <select value={collection} onChange={(e) => setCollection(e.currentTarget.value)}>
              <option value="">All</option>
              {collections.map((c) => (
                <option key={c}>{c}</option>
              ))}
            </select>
          </label>
          <label>
            User
            <select value={user} onChange={(e) => setUser(e.currentTarget.value)}>
              <option value="">All</option>
              {users.map((u) => (
                <option key={u}>{u}</option>
              ))}
            </select>
          </label>
          <label>
            Age
            <select value={age} onChange={(e) => setAge(e.currentTarget.value)}>
              {AGES.map((a) => (
                <option key={a.id} value={a.id}>
                  {a.label}
                </option>
              ))}
            </select>
          </label>
          <span class="muted small filter-count">
            {shown.length} of {all.length} shown
          </span>
        </div>
      )}
      {authority && shown.length > 0 && (
        <div class="bulk" role="toolbar" aria-label="Selected proposals">
          <label class="check">
            <input type="checkbox" checked={allChosen} onChange={toggleAll} /> Select all shown
          </label>
          <button class="btn btn-primary" disabled={busy || chosen.length === 0} onClick={() => settle("accept", chosen)}>
            Accept {chosen.length || ""} selected
          </button>
          <button class="btn" disabled={busy || chosen.length === 0} onClick={() => settle("reject", chosen)}>
            Reject {chosen.length || ""} selected
          </button>
        </div>
      )}
      {data && all.length === 0 && (
        <Empty title="Nothing waiting.">
          {authority
            ? "When a device writes a field the schema marks `authority` (a payment's amount, say), its value waits here for you. New ones appear as soon as the device syncs."
            : "Values this node writes to authority fields wait here until the office accepts them."}
        </Empty>
      )}
      {data && all.length > 0 && shown.length === 0 && <Empty title="No proposal matches these filters.">Choose “All” or “Any age” to see the others.</Empty>}
      {shown.length > 0 && (
        <div class="table-wrap">
          <table class="table cards" aria-label="Proposals">
            <thead>
              <tr>
                {authority && (
                  <th scope="col">
                    <span class="sr-only">Select</span>
                  </th>
                )}
                <th scope="col">Entity</th>
                <th scope="col">Field</th>
                <th scope="col">Proposed</th>
                <th scope="col">Confirmed now</th>
                <th scope="col">By</th>
                <th scope="col">When</th>
                {authority && (
                  <th scope="col">
                    <span class="sr-only">Actions</span>
                  </th>
                )}
              </tr>
            </thead>
            <tbody>
              {shown.map((p) => {
                const view = data.views[`${p.collection}/${p.entity}`];
                const confirmed = view ? view[p.field] : undefined;
                return (
                  <tr key={p.id} data-proposal={p.id} data-entity={p.entity}>
                    {authority && (
                      <td class="select">
                        <input type="checkbox" checked={selected.has(p.id)} onChange={() => toggle(p.id)} aria-label={`Select the proposal for ${p.collection} ${short(p.entity)}`} />
                      </td>
                    )}
                    <td data-label="Entity">
                      <a href={`#/data/${enc(p.collection)}/${enc(p.entity)}`}>
                        {p.collection} <span class="muted">{short(p.entity)}</span>
                      </a>
                    </td>
                    <td data-label="Field">{p.field}</td>
                    <td data-label="Proposed" class="proposed">
                      <Value v={p.value} />
                    </td>
                    <td data-label="Confirmed now" class="confirmed">
                      {confirmed === undefined ? <span class="muted">none yet</span> : <Value v={confirmed} />}
                    </td>
                    <td data-label="By">{p.user}</td>
                    <td data-label="When">
                      <Time ms={p.time_ms} />
                    </td>
                    {authority && (
                      <td class="actions">
                        <button class="btn btn-small btn-primary" disabled={busy} onClick={() => settle("accept", [p])} aria-label={`Accept ${p.field} = ${JSON.stringify(p.value)}`}>
                          Accept
                        </button>
                        <button class="btn btn-small" disabled={busy} onClick={() => settle("reject", [p])} aria-label={`Reject ${p.field} = ${JSON.stringify(p.value)}`}>
                          Reject
                        </button>
                      </td>
                    )}
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
    </>
  );
}
