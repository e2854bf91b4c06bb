// fieldsync in a browser tab: a full device whose entities live in IndexedDB, that works
// with no network and syncs with a relay over WebSocket when it can. The rules, the sync
// protocol and the membership checks are fieldsync's Rust core, compiled to WebAssembly
// (fieldsync_wasm.js beside this file); this module only keeps the bytes in IndexedDB.
//
//   const device = await Device.open({ name, invite, relay });
//   const id = await device.put("tasks", null, { title: "Fit boiler", status: "open" });
//   await device.get("tasks", id); await device.list("tasks", { where: { status: "open" } });
//   const stop = device.subscribe((event) => console.log(event));

import init, { Node } from "./fieldsync_wasm.js";

const KV = "kv";
let loaded;

/** Loads the WebAssembly module once (from beside this file). */
function load() {
  loaded ??= init({ module_or_path: new URL("./fieldsync_wasm_bg.wasm", import.meta.url) });
  return loaded;
}

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function openDatabase(name) {
  const req = indexedDB.open(`fieldsync:${name}`, 1);
  req.onupgradeneeded = () => req.result.createObjectStore(KV);
  return request(req);
}

/** Every saved key and value, in key order. */
async function readAll(db) {
  const tx = db.transaction(KV, "readonly");
  const store = tx.objectStore(KV);
  const [keys, values] = await Promise.all([request(store.getAllKeys()), request(store.getAll())]);
  return [keys.map((k) => new Uint8Array(k)), values];
}

/**
 * Saves `writes` ([key, value | null] pairs, in order) in one transaction, created now so
 * saves apply in the order they were asked for; settles once the transaction committed.
 */
function save(db, writes) {
  if (writes.length === 0) return Promise.resolve();
  const tx = db.transaction(KV, "readwrite", { durability: "strict" });
  const store = tx.objectStore(KV);
  for (const [key, value] of writes) {
    if (value === null) store.delete(key);
    else store.put(value, key);
  }
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error("the IndexedDB transaction was aborted"));
  });
}

const json = (value) => (typeof value === "string" ? value : JSON.stringify(value));

/** `{ field: value }` or `["field=value"]` → the CLI's `--where` filters. */
function filters(where) {
  if (!where) return [];
  if (Array.isArray(where)) return where.map(String);
  return Object.entries(where).map(([field, value]) => `${field}=${value}`);
}

export class Device {
  #node;
  #db;
  #listeners = new Set();
  #closed = false;

  constructor(node, db) {
    this.#node = node;
    this.#db = db;
  }

  /**
   * Opens the device stored as `name`, or creates it from `invite` (the invite JSON, a
   * string or object; used only the first time). With `relay` (the relay's `/ws` or
   * `/tls/ws` multiaddr ending in `/p2p/<id>`) it syncs whenever the relay is reachable.
   */
  static async open({ name, invite, relay } = {}) {
    if (!name) throw new Error("Device.open needs a name (the IndexedDB store to open or create)");
    await load();
    const db = await openDatabase(name);
    const [keys, values] = await readAll(db);
    let node;
    if (keys.length > 0) {
      node = Node.reopen(keys, values);
    } else if (invite) {
      node = Node.join(json(invite), name);
    } else {
      db.close();
      throw new Error(`no device is stored as "${name}": give an invite the first time`);
    }
    const device = new Device(node, db);
    await device.#save();
    if (relay) {
      node.startSync(
        relay,
        (writes) => save(db, writes),
        (event) => device.#emit(JSON.parse(event)),
      );
    }
    return device;
  }

  /** What this device wrote since the last save, into IndexedDB. */
  #save() {
    return save(this.#db, this.#node.takeWrites());
  }

  #emit(event) {
    for (const listener of this.#listeners) {
      try {
        listener(event);
      } catch (e) {
        console.error("fieldsync: a subscriber threw", e);
      }
    }
  }

  #open() {
    if (this.#closed) throw new Error("this device is closed");
    return this.#node;
  }

  /** The device's peer id (as `fieldsync status` shows it). */
  get peerId() {
    return this.#open().peerId();
  }

  /** Creates (`id` null) or updates an entity; resolves with its id once it is saved. */
  async put(collection, id, patch) {
    const out = this.#open().put(collection, id ?? undefined, json(patch));
    await this.#save();
    this.#emit({ event: "changed", collection, id: out });
    return out;
  }

  /** The entity's view, as the CLI prints it. */
  async get(collection, id) {
    return JSON.parse(this.#open().get(collection, id));
  }

  /** The views of `collection`, filtered by `where` ({ field: value } or ["field=value"]). */
  async list(collection, { where } = {}) {
    return JSON.parse(this.#open().list(collection, filters(where)));
  }

  async delete(collection, id) {
    this.#open().delete(collection, id);
    await this.#save();
    this.#emit({ event: "changed", collection, id });
  }

  /** Open conflicts, as `fieldsync conflicts` prints them. */
  async conflicts() {
    return JSON.parse(this.#open().conflicts());
  }

  /** Settles a conflict with `value` (any JSON value: "09:00" is the string); resolves
   * with the entity's id once saved. */
  async resolve(conflictId, value) {
    const id = this.#open().resolve(conflictId, JSON.stringify(value));
    await this.#save();
    this.#emit({ event: "changed", id });
    return id;
  }

  /** `fieldsync status`, with `connected` (the relay session is up). */
  async status() {
    return JSON.parse(this.#open().status());
  }

  /** Calls `listener` with every event (entity changes, sync events); returns `stop`. */
  subscribe(listener) {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Stops syncing and closes the store; the device reopens with `Device.open({ name })`. */
  async close() {
    if (this.#closed) return;
    this.#node.stopSync();
    await this.#save();
    this.#closed = true;
    this.#listeners.clear();
    this.#db.close();
  }
}
