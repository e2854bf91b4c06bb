// Types of fieldsync.js: a browser tab as a fieldsync device.

/** An entity's view, as the CLI prints it: `_id`, `_collection`, fields, `_pending`… */
export type View = { _id: string; _collection: string; [field: string]: unknown };

/** A patch in the CLI's language: values set fields, null removes one, {"$inc": n},
 * {"$add": [...]}, {"$remove": [...]}. A string is taken as JSON. */
export type Patch = Record<string, unknown> | string;

/** The daemon's JSON Lines events (sync_started, sync_completed, refused, …) and
 * `changed` (entities were written here or arrived). */
export type DeviceEvent = { event: string; [key: string]: unknown };

export interface OpenOptions {
  /** The IndexedDB store to open or create. */
  name: string;
  /** The invite JSON (from `fieldsync invite`), used only the first time. */
  invite?: string | object;
  /** The relay's /ws or /tls/ws multiaddr ending in /p2p/<peer id>. */
  relay?: string;
}

/** An entry of an `attachments` field: the file's BLAKE3 hash (hex), size in bytes,
 * media type and name. */
export type Reference = { hash: string; size: number; mime: string; name: string };

/** Why `blob` failed: `code` tells the cases apart. */
export interface BlobError extends Error {
  code: "NOT_CONNECTED" | "NOT_HERE" | "REFUSED" | "FAILED";
}

export class Device {
  static open(options: OpenOptions): Promise<Device>;
  readonly peerId: string;
  put(collection: string, id: string | null, patch: Patch): Promise<string>;
  get(collection: string, id: string): Promise<View>;
  list(collection: string, options?: { where?: Record<string, string | number | boolean> | string[] }): Promise<View[]>;
  delete(collection: string, id: string): Promise<void>;
  /** Saves the file in IndexedDB, then adds its reference to the `attachments` field
   * `field` (a file is at most 64 MiB in the browser). */
  attach(collection: string, id: string, field: string, data: Uint8Array | ArrayBuffer | ArrayBufferView | Blob,
    options?: { mime?: string; name?: string }): Promise<Reference>;
  /** The file's bytes, from IndexedDB or fetched (verified) from the relay; rejects with a
   * {@link BlobError}. */
  blob(hash: string): Promise<Uint8Array>;
  conflicts(): Promise<Array<Record<string, unknown>>>;
  resolve(conflictId: string, value: unknown): Promise<string>;
  status(): Promise<{ peer_id: string; connected: boolean; membership?: unknown; [key: string]: unknown }>;
  subscribe(listener: (event: DeviceEvent) => void): () => void;
  close(): Promise<void>;
}
