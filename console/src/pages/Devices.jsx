// Devices: every member with who and what it is, whether it is online, when it was last
// seen, how far behind it is, refused or revoked; revoke one; pending invites and new ones
// with a QR code a field device can scan.
import { useState } from "preact/hooks";
import { encode } from "uqr";
import { api, enc } from "../api.js";
import { Confirm, Empty, Loading, Problem, Time, notify, short, useAction, useLive } from "../ui.jsx";

const LIVE = /^(peer_|sync_|acknowledged|entity_changed)/;

function state(d) {
  if (d.revoked) return { key: "revoked", label: "Revoked" };
  if (d.refused) return { key: "refused", label: "Refused" };
  if (d.this_node) return { key: "self", label: "This node" };
  if (d.online) return { key: "online", label: "Online" };
  return { key: "offline", label: "Offline" };
}

function Behind({ d }) {
  if (d.this_node) return <span class="muted">—</span>;
  if (d.revoked) return <span class="muted">cut off</span>;
  const parts = [];
  if (d.unacked > 0) parts.push(`${d.unacked}${d.unacked_capped ? "+" : ""} change${d.unacked === 1 ? "" : "s"} not yet acknowledged`);
  if (d.incoming > 0) parts.push(`receiving ${d.incoming} of its changes`);
  if (!parts.length) return <span class="ok-text">Up to date</span>;
  return <span class="warn-text">{parts.join(" · ")}</span>;
}

export function Devices({ status }) {
  const { data, error, loading, reload } = useLive("/v1/devices", (e) => LIVE.test(e.event));
  const invites = useLive("/v1/invites", (e) => e.event === "entity_changed" && e.collection === "_members");
  const [revoking, setRevoking] = useState(null);
  const [busy, run] = useAction();
  const authority = status.authority;

  const revoke = async () => {
    const d = revoking;
    setRevoking(null);
    await run(() => api(`/v1/members/${enc(d.peer)}/revoke`, { method: "POST" }), `${d.name || d.user} is revoked: every node refuses it from now on.`);
    reload();
  };

  const devices = data ? data.devices : [];
  const online = devices.filter((d) => d.online).length;
  return (
    <>
      <div class="page-head">
        <h1>Devices</h1>
        {data && (
          <p class="sub">
            {devices.length} member{devices.length === 1 ? "" : "s"}, {online} online now
          </p>
        )}
      </div>
      <Problem error={error} retry={reload} />
      {loading && !data && <Loading />}
      {data && devices.length === 0 && (
        <Empty title="No devices have joined yet.">
          {authority ? "Issue an invite below and scan its QR code on the device, or save it and run fieldsync init --join FILE there." : "Devices join through the workspace authority."}
        </Empty>
      )}
      {devices.length > 0 && (
        <div class="table-wrap">
          <table class="table cards" aria-label="Members">
            <thead>
              <tr>
                <th scope="col">Device</th>
                <th scope="col">Role</th>
                <th scope="col">State</th>
                <th scope="col">Last seen</th>
                <th scope="col">Sync</th>
                <th scope="col">
                  <span class="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {devices.map((d) => {
                const s = state(d);
                return (
                  <tr key={d.peer} data-peer={d.peer} data-state={s.key}>
                    <td data-label="Device">
                      <strong>{d.name || "(unnamed)"}</strong>
                      <div class="muted small">
                        user <b>{d.user}</b> · <span title={d.peer}>{short(d.peer, 14)}</span>
                      </div>
                    </td>
                    <td data-label="Role">
                      {d.role}
                      {d.partitions && Object.keys(d.partitions).length > 0 && (
                        <div class="muted small">
                          {Object.entries(d.partitions)
                            .map(([c, a]) => `${c}: ${a}`)
                            .join(", ")}
                        </div>
                      )}
                    </td>
                    <td data-label="State">
                      <span class={`pill pill-${s.key}`}>{s.label}</span>
                      {d.revoked && <div class="muted small">revoked by the authority; refused everywhere</div>}
                      {!d.revoked && d.refused && (
                        <div class="muted small">
                          {d.refused.reason} · <Time ms={d.refused.at_ms} />
                        </div>
                      )}
                    </td>
                    <td data-label="Last seen">
                      {d.this_node ? <span class="muted">—</span> : <Time ms={d.online ? Date.now() : d.last_seen_ms} />}
                      {d.last_sync_ms && (
                        <div class="muted small">
                          synced <Time ms={d.last_sync_ms} />
                        </div>
                      )}
                    </td>
                    <td data-label="Sync">
                      <Behind d={d} />
                    </td>
                    <td class="actions">
                      {authority && !d.this_node && !d.revoked && (
                        <button class="btn btn-danger-quiet" disabled={busy} onClick={() => setRevoking(d)} aria-label={`Revoke ${d.name || d.user}`}>
                          Revoke…
                        </button>
                      )}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
      {data && data.refused.length > 0 && (
        <section class="section" aria-labelledby="strangers">
          <h2 id="strangers">Refused lately</h2>
          <p class="muted">Peers that tried to sync and are not members (a device with an old or cancelled invite, or a stranger).</p>
          <ul class="list">
            {data.refused.map((r) => (
              <li key={r.peer}>
                <span title={r.peer}>{short(r.peer, 14)}</span> — {r.reason} · <Time ms={r.at_ms} />
              </li>
            ))}
          </ul>
        </section>
      )}
      {authority && <Invites invites={invites} />}
      {revoking && (
        <Confirm title={`Revoke ${revoking.name || revoking.user}?`} confirm="Revoke device" danger onConfirm={revoke} onCancel={() => setRevoking(null)}>
          <p>
            The device <b>{revoking.name || "(unnamed)"}</b> of user <b>{revoking.user}</b> is cut off at once and every node refuses it from
            now on. What it wrote before stays. This cannot be undone: to let it back, invite it again.
          </p>
        </Confirm>
      )}
    </>
  );
}

function Qr({ text }) {
  let qr;
  try {
    qr = encode(text, { ecc: "L", border: 2 });
  } catch {
    return <p class="problem">This invite is too long for a QR code: save the file instead.</p>;
  }
  const cells = [];
  qr.data.forEach((row, y) =>
    row.forEach((on, x) => {
      if (on) cells.push(`M${x} ${y}h1v1h-1z`);
    }),
  );
  return (
    <svg class="qr" viewBox={`0 0 ${qr.size} ${qr.size}`} role="img" aria-label="QR code of the invite" shape-rendering="crispEdges">
      <rect width={qr.size} height={qr.size} fill="#fff" />
      <path d={cells.join("")} fill="#000" />
    </svg>
  );
}

function Invites({ invites }) {
  const [user, setUser] = useState("");
  const [role, setRole] = useState("device");
  const [hours, setHours] = useState("168");
  const [issued, setIssued] = useState(null);
  const [busy, run] = useAction();
  const issue = async (e) => {
    e.preventDefault();
    if (!user.trim()) return notify("Enter the user the device belongs to.", "error");
    const invite = await run(() => api("/v1/invites", { method: "POST", body: { user: user.trim(), role, valid_secs: Math.round(Number(hours) * 3600) } }));
    if (invite) {
      setIssued({ user: user.trim(), text: JSON.stringify(invite) });
      setUser("");
      invites.reload();
    }
  };
  const cancel = async (i) => {
    await run(() => api(`/v1/invites/${enc(i.id)}/cancel`, { method: "POST" }), `The invite for ${i.user} is cancelled.`);
    invites.reload();
  };
  const download = () => {
    const url = URL.createObjectURL(new Blob([issued.text], { type: "application/json" }));
    const a = document.createElement("a");
    a.href = url;
    a.download = `invite-${issued.user}.json`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  };
  const list = invites.data || [];
  return (
    <section class="section" aria-labelledby="invites">
      <h2 id="invites">Invites</h2>
      <div class="invite-grid">
        <form class="card form" onSubmit={issue}>
          <h3>New invite</h3>
          <label for="inv-user">User</label>
          <input id="inv-user" value={user} onInput={(e) => setUser(e.currentTarget.value)} placeholder="e.g. ana" required />
          <label for="inv-role">Role</label>
          <select id="inv-role" value={role} onChange={(e) => setRole(e.currentTarget.value)}>
            <option value="device">device — sees its partitions</option>
            <option value="admin">admin — sees everything</option>
            <option value="relay">relay</option>
          </select>
          <label for="inv-hours">Valid for</label>
          <select id="inv-hours" value={hours} onChange={(e) => setHours(e.currentTarget.value)}>
            <option value="1">1 hour</option>
            <option value="24">1 day</option>
            <option value="168">1 week</option>
            <option value="720">30 days</option>
          </select>
          <button class="btn btn-primary" type="submit" disabled={busy}>
            Issue invite
          </button>
        </form>
        {issued && (
          <div class="card invite-out" aria-live="polite">
            <h3>Invite for {issued.user}</h3>
            <Qr text={issued.text} />
            <p class="small">
              Scan it on the device, or save the file and run <code>fieldsync init --join invite-{issued.user}.json</code> there. It admits one device.
            </p>
            <div class="row">
              <button class="btn" onClick={download}>
                Save invite file
              </button>
              <button class="btn btn-quiet" onClick={() => setIssued(null)}>
                Done
              </button>
            </div>
          </div>
        )}
      </div>
      <h3>Pending</h3>
      <Problem error={invites.error} retry={invites.reload} />
      {invites.data && list.length === 0 && <Empty title="No pending invites.">An invite shows here until a device uses it, it expires, or you cancel it.</Empty>}
      {list.length > 0 && (
        <ul class="list">
          {list.map((i) => (
            <li key={i.id} class="list-row">
              <span>
                <b>{i.user}</b> · {i.role} · issued <Time ms={i.issued_ms} /> · expires <Time ms={i.expires_ms} />
              </span>
              <button class="btn btn-small" disabled={busy} onClick={() => cancel(i)} aria-label={`Cancel the invite for ${i.user}`}>
                Cancel
              </button>
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}
