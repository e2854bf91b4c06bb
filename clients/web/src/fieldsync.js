// fieldsync in a browser tab: a full device whose entities live in IndexedDB, that works
// with no network and syncs with a relay over WebSocket when it can. The rules, the sync
// protocol and the membership checks are fieldsync's Rust core, compiled to WebAssembly
// (fieldsync_wasm.js beside this file); this module only keeps the bytes in IndexedDB.
//
//   const device = await Device.open({ name, invite, relay });
//   const id = await device.put("tasks", null, { title: "Fit boiler", status: "open" });
//   await device.get("tasks", id); await device.list("tasks", { where: { status: "open" } });
//   const stop = device.subscribe((event) => console.log(event));
//   const ref = await device.attach("jobs", id, "photos", file);   // a File, Blob or bytes
//   const bytes = await device.blob(ref.hash);                      // here, or from the relay

import init, { Node } from "./fieldsync_wasm.js";

const KV = "kv";
// Attachments' files, whole, by hash; and their sizes (read at open without the bytes).
const BLOBS = "blobs";
const BLOB_SIZES = "blob_sizes";
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
  // Version 2 added the attachments' stores; a version 1 database gains them here.
  const req = indexedDB.open(`fieldsync:${name}`, 2);
  req.onupgradeneeded = () => {
    for (const store of [KV, BLOBS, BLOB_SIZES]) {
      if (!req.result.objectStoreNames.contains(store)) req.result.createObjectStore(store);
    }
  };
  return request(req);
}

/** Settles once `tx` committed. */
function committed(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error("the IndexedDB transaction was aborted"));
  });
}

/** Saves a file and its size in one transaction, durably (before anything references it). */
function saveBlob(db, hash, bytes) {
  const tx = db.transaction([BLOBS, BLOB_SIZES], "readwrite", { durability: "strict" });
  tx.objectStore(BLOBS).put(bytes, hash);
  tx.objectStore(BLOB_SIZES).put(bytes.length, hash);
  return committed(tx);
}

/** The saved file `hash` (a Uint8Array), or undefined. */
async function loadBlob(db, hash) {
  const tx = db.transaction(BLOBS, "readonly");
  const bytes = await request(tx.objectStore(BLOBS).get(hash));
  return bytes === undefined ? undefined : new Uint8Array(bytes);
}

/** [hash, size] of every saved file. */
async function blobSizes(db) {
  const store = db.transaction(BLOB_SIZES, "readonly").objectStore(BLOB_SIZES);
  const [hashes, sizes] = await Promise.all([request(store.getAllKeys()), request(store.getAll())]);
  return hashes.map((h, i) => [h, sizes[i]]);
}

/** A Uint8Array, ArrayBuffer, typed array view or Blob (File) as a Uint8Array. */
async function toBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (typeof Blob !== "undefined" && data instanceof Blob) return new Uint8Array(await data.arrayBuffer());
  throw new TypeError("attach takes the file as a Uint8Array, an ArrayBuffer or a Blob (File)");
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
  return committed(tx);
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
    for (const [hash, size] of await blobSizes(db)) node.holdBlob(hash, size);
    const device = new Device(node, db);
    await device.#save();
    if (relay) {
      node.startSync(
        relay,
        (writes) => save(db, writes),
        (event) => device.#emit(JSON.parse(event)),
        (hash) => loadBlob(db, hash),
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

  /**
   * Attaches a file (Uint8Array, ArrayBuffer or Blob/File) to the `attachments` field
   * `field` of entity `id`: hashes it (BLAKE3), saves it in IndexedDB, and only then adds
   * its reference `{hash, size, mime, name}` to the field, as the CLI's `attach` does;
   * resolves with the reference. The relay fetches the file from this tab once it syncs
   * the reference. `mime` defaults to a Blob's type (else application/octet-stream),
   * `name` to a File's name. Refused with a clear Error for a field under another rule,
   * an entity that does not exist, or a file over the browser's 64 MiB limit.
   */
  async attach(collection, id, field, data, { mime, name } = {}) {
    const node = this.#open();
    node.checkAttach(collection, id, field);
    // A Blob (File) over the limit is refused before its bytes are read into memory.
    if (typeof Blob !== "undefined" && data instanceof Blob) node.checkBlobSize(data.size);
    const bytes = await toBytes(data);
    const hash = node.hashBlob(bytes);
    await saveBlob(this.#db, hash, bytes);
    node.holdBlob(hash, bytes.length);
    const reference = {
      hash,
      size: bytes.length,
      mime: mime || data?.type || "application/octet-stream",
      name: name ?? data?.name ?? "",
    };
    const out = JSON.parse(this.#open().attach(collection, id, field, JSON.stringify(reference)));
    await this.#save();
    this.#emit({ event: "changed", collection, id });
    return out;
  }

  /**
   * The bytes of the file `hash` (a reference's `hash`): from IndexedDB, or else fetched
   * from the relay (which asks its other peers when it lacks it), checked chunk by chunk
   * against the hash as they arrive and saved here before they are returned. Rejects with
   * an Error whose `code` is NOT_CONNECTED, NOT_HERE (no peer holds it), REFUSED (no
   * entity this device may see references it) or FAILED (the transfer broke or the bytes
   * were wrong; nothing was kept).
   */
  async blob(hash) {
    const node = this.#open();
    const held = await loadBlob(this.#db, hash);
    if (held !== undefined) return held;
    const bytes = await node.fetchBlob(hash);
    await saveBlob(this.#db, hash, bytes);
    node.holdBlob(hash, bytes.length);
    return bytes;
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
