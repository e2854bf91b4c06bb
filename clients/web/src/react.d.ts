// Types of react.js: React hooks over a fieldsync Device.
import type { Device, View } from "./fieldsync.js";

export interface Read<T> { data: T | undefined; error: Error | null; loading: boolean }
export function useEntity(device: Device | null, collection: string, id: string): Read<View>;
export function useList(device: Device | null, collection: string, where?: Record<string, string | number | boolean>): Read<View[]>;
export function useSyncStatus(device: Device | null, options?: { intervalMs?: number }): Awaited<ReturnType<Device["status"]>> | null;
