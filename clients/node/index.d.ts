// Type definitions for claypot-client.

/** Element types of a typed array, by numpy name. */
export type DType =
  | 'bool' | 'int8' | 'uint8' | 'int16' | 'uint16' | 'int32' | 'uint32'
  | 'int64' | 'uint64' | 'float16' | 'float32' | 'float64' | 'complex64' | 'complex128';

export type AnyTypedArray =
  | Int8Array | Uint8Array | Uint8ClampedArray | Int16Array | Uint16Array
  | Int32Array | Uint32Array | BigInt64Array | BigUint64Array | Float32Array | Float64Array;

/**
 * A numpy array: row-major data in a TypedArray of the matching type
 * (bool as Uint8Array, float16 as its raw bits in a Uint16Array,
 * complex as interleaved real/imaginary floats).
 */
export interface NDArray<T extends AnyTypedArray = AnyTypedArray> {
  dtype: DType;
  shape: number[];
  data: T;
}

/** What setArray accepts: a TypedArray (1-d) or data with a shape (and dtype for bool/float16/complex). */
export type ArrayInput = AnyTypedArray | { data: AnyTypedArray; shape?: number[]; dtype?: DType };

/** JSON values, as CallJson carries them. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A persistent object's identity, its class and where it lives. */
export interface ObjectRef {
  objectId: string;
  classKey: string;
  backendId: string;
}

/** An object named by alias, or by the ObjectRef getByAlias/createObject returned. */
export type Target = string | ObjectRef;

export interface BackendInfo {
  backendId: string;
  address: string;
  host: string;
  pid: number;
  up: boolean;
  objects: number;
  memoryBytes: number;
  residentObjects: number;
  runningTasks: number;
}

export interface ConnectOptions {
  /** The cluster token (default: CLAYPOT_TOKEN). */
  token?: string;
  /** Seconds for directory calls (default 10). */
  timeout?: number;
  /** Seconds a method call or array read may take (default 600). */
  callTimeout?: number;
  /** PEM of the CA that signed the backends' certificates: use TLS. */
  ca?: string | Buffer;
  /**
   * Send typed-array reads and writes straight to the object's owner (at the
   * address it registered) instead of through the backend connected to.
   * Falls back to that backend when the owner cannot be reached.
   */
  direct?: boolean;
}

/** The error codes of the README's error table. */
export type ErrorCode =
  | 'ClaypotError' | 'ConfigurationError' | 'AuthenticationError' | 'ProtocolError'
  | 'SerializationError' | 'ClassNotFound' | 'ValueTooLarge' | 'ObjectError'
  | 'ObjectNotFound' | 'ObjectMoved' | 'AliasNotFound' | 'AliasExists' | 'NotPersistent'
  | 'AlreadyPersistent' | 'ObjectCorrupt' | 'ObjectBusy' | 'InvalidKey' | 'NotAVersion' | 'FeatureUnavailable' | 'BackendError' | 'BackendNotFound'
  | 'BackendUnavailable' | 'BackendDown' | 'CallInterrupted' | 'StorageFailed' | 'DeadlineExceeded' | 'TaskError'
  | 'TaskCancelled' | 'TaskTimeout' | 'RemoteError';

/** Every failure: `code` names a store.errors class (or RemoteError for user code). */
export class ClaypotError extends Error {
  code: ErrorCode;
  /** gRPC status name, e.g. 'NOT_FOUND'. */
  grpcStatus: string;
  /** gRPC status number. */
  grpcCode: number;
  /** For RemoteError: the Python exception's qualified type. */
  remoteType: string;
  traceback: string;
}

export class Client {
  readonly address: string;
  readonly direct: boolean;
  ping(): Promise<{ backendId: string; address: string; host: string; pid: number }>;
  getByAlias(alias: string): Promise<ObjectRef>;
  getById(objectId: string): Promise<ObjectRef>;
  /** The owner backend of an object and its registered address. */
  locate(target: Target): Promise<{ backendId: string; address: string }>;
  call(target: Target, method: string, args?: Json[], kwargs?: { [key: string]: Json },
       options?: { array?: false }): Promise<Json>;
  call(target: Target, method: string, args: Json[], kwargs: { [key: string]: Json },
       options: { array: true }): Promise<NDArray>;
  get(target: Target, name: string, options?: { array?: boolean }): Promise<Json | NDArray>;
  getArray(target: Target, name: string): Promise<NDArray>;
  set(target: Target, name: string, value: Json | ArrayInput): Promise<void>;
  setArray(target: Target, name: string, value: ArrayInput): Promise<ObjectRef>;
  createObject(className: string, args?: Json[], kwargs?: { [key: string]: Json },
               options?: { alias?: string; backend?: string }): Promise<ObjectRef>;
  delete(target: Target): Promise<void>;
  backends(): Promise<BackendInfo[]>;
  close(): void;
}

/** Connect through the backend at `address` (default CLAYPOT_ADDRESS). */
export function connect(address?: string, options?: ConnectOptions): Promise<Client>;

/** The gRPC status name each error code ends a call with. */
export const STATUS_BY_CODE: Readonly<Record<ErrorCode, string>>;
export const DTYPES: DType[];
