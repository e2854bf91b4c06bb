// Data: the collections, their entities page by page, and an entity's view and history.
import { useState } from "preact/hooks";
import { api, enc } from "../api.js";
import { Empty, Loading, Problem, Time, Value, short, useLive } from "../ui.jsx";

const PAGE = 25;

function Collections({ status }) {
  const counts = Object.entries(status.entities || {}).sort(([a], [b]) => (a.startsWith("_") - b.startsWith("_")) || a.localeCompare(b));
  return (
    <>
      <div class="page-head">
        <h1>Data</h1>
        <p class="sub">Every collection this node holds. Pick one to browse its entities.</p>
      </div>
      {counts.length === 0 ? (
        <Empty title="No data yet.">Entities appear here as apps write them through the API or the CLI, or as devices sync.</Empty>
      ) : (
        <ul class="tiles">
          {counts.map(([c, n]) => (
            <li key={c}>
              <a class="tile" href={`#/data/${enc(c)}`}>
                <span class="tile-name">{c}</span>
                <span class="tile-count">
                  {n} entit{n === 1 ? "y" : "ies"}
                </span>
                {c.startsWith("_") && <span class="muted small">built in</span>}
              </a>
            </li>
          ))}
        </ul>
      )}
    </>
  );
}

function Collection({ collection }) {
  // The cursors of the pages seen so far: going back needs no server state.
  const [cursors, setCursors] = useState([null]);
  const [deleted, setDeleted] = useState(false);
  const cursor = cursors[cursors.length - 1];
  const path = `/v1/collections/${enc(collection)}?limit=${PAGE}&include_deleted=${deleted}${cursor ? `&cursor=${enc(cursor)}` : ""}`;
  const { data, error, loading, reload } = useLive(path, (e) => e.event === "entity_changed" && e.collection === collection, [path]);
  const items = data ? data.items : [];
  const fields = [...new Set(items.flatMap((v) => Object.keys(v).filter((k) => !k.startsWith("_"))))].slice(0, 6);
  return (
    <>
      <div class="page-head">
        <p class="crumbs">
          <a href="#/data">Data</a> /
        </p>
        <h1>{collection}</h1>
      </div>
      <div class="filters">
        <label class="check">
          <input type="checkbox" checked={deleted} onChange={(e) => (setDeleted(e.currentTarget.checked), setCursors([null]))} /> Show deleted
        </label>
        <span class="muted small filter-count">
          page {cursors.length}
          {loading ? " · loading…" : ""}
        </span>
      </div>
      <Problem error={error} retry={reload} />
      {loading && !data && <Loading />}
      {data && items.length === 0 && <Empty title={`No entities in ${collection}${cursors.length > 1 ? " on this page" : ""}.`}>Apps create them through the API (POST /v1/collections/{collection}) or with fieldsync put.</Empty>}
      {items.length > 0 && (
        <div class="table-wrap">
          <table class="table cards" aria-label={`${collection} entities`}>
            <thead>
              <tr>
                <th scope="col">Id</th>
                {fields.map((f) => (
                  <th scope="col" key={f}>
                    {f}
                  </th>
                ))}
              </tr>
            </thead>
            <tbody>
              {items.map((v) => (
                <tr key={v._id} class={v._deleted ? "deleted" : ""}>
                  <td data-label="Id">
                    <a href={`#/data/${enc(collection)}/${enc(v._id)}`} title={v._id}>
                      {short(v._id)}
                    </a>
                    {v._deleted && <span class="pill pill-revoked">deleted</span>}
                  </td>
                  {fields.map((f) => (
                    <td data-label={f} key={f}>
                      <Value v={v[f]} />
                    </td>
                  ))}
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      <div class="pager">
        <button class="btn" disabled={cursors.length === 1} onClick={() => setCursors((c) => c.slice(0, -1))}>
          ← Previous
        </button>
        <button class="btn" disabled={!data || !data.next} onClick={() => setCursors((c) => [...c, data.next])}>
          Next →
        </button>
      </div>
    </>
  );
}

function Entity({ collection, id }) {
  const view = useLive(`/v1/collections/${enc(collection)}/${enc(id)}?include_deleted=true`, (e) => e.event === "entity_changed" && e.id === id, [collection, id]);
  const history = useLive(`/v1/collections/${enc(collection)}/${enc(id)}/history`, (e) => e.event === "entity_changed" && e.id === id, [collection, id]);
  const v = view.data || {};
  const fields = Object.entries(v).filter(([k]) => !k.startsWith("_"));
  const meta = Object.entries(v).filter(([k]) => k.startsWith("_") && k !== "_id");
  const entries = history.data ? [...history.data].reverse() : [];
  return (
    <>
      <div class="page-head">
        <p class="crumbs">
          <a href="#/data">Data</a> / <a href={`#/data/${enc(collection)}`}>{collection}</a> /
        </p>
        <h1 class="mono-title">{id}</h1>
      </div>
      <Problem error={view.error} retry={view.reload} />
      {view.loading && !view.data && <Loading />}
      {view.data && (
        <div class="entity-grid">
          <section class="card" aria-labelledby="view-h">
            <h2 id="view-h">View</h2>
            {v._deleted && <p class="banner banner-danger">This entity is deleted (its tombstone syncs like any write).</p>}
            <dl class="fields">
              {fields.map(([k, val]) => (
                <div key={k}>
                  <dt>{k}</dt>
                  <dd>
                    <Value v={val} />
                  </dd>
                </div>
              ))}
              {meta.map(([k, val]) => (
                <div key={k} class="meta">
                  <dt>{k}</dt>
                  <dd>
                    <Value v={val} />
                  </dd>
                </div>
              ))}
            </dl>
          </section>
          <section class="card" aria-labelledby="hist-h">
            <h2 id="hist-h">History</h2>
            <Problem error={history.error} retry={history.reload} />
            {entries.length === 0 && history.data && <p class="muted">No changes recorded.</p>}
            <ol class="history">
              {entries.map((h) => (
                <li key={h.change}>
                  <div class="history-head">
                    <b>{h.kind}</b> by {h.user} · <Time ms={h.time_ms} />{" "}
                    <span class="muted small" title={h.device}>
                      on {short(h.device, 12)}
                    </span>
                  </div>
                  {h.changes && h.changes.length > 0 ? (
                    <ul class="diff">
                      {h.changes.map((c) => (
                        <li key={c.field}>
                          <code>{c.field}</code>: <Value v={c.before} /> → <Value v={c.after} />
                        </li>
                      ))}
                    </ul>
                  ) : (
                    <div class="muted small">{h.fields.join(", ")}</div>
                  )}
                </li>
              ))}
            </ol>
          </section>
        </div>
      )}
    </>
  );
}

export function Data({ status, rest }) {
  const [collection, id] = rest;
  if (collection && id) return <Entity collection={collection} id={id} />;
  if (collection) return <Collection key={collection} collection={collection} />;
  return <Collections status={status} />;
}
