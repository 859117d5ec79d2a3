'use strict';
// claypot-client: a promise-based Node.js client of a claypot cluster.
//
// It speaks claypot's gRPC contract (proto/claypot.proto): values as JSON
// (CallJson), numpy arrays as typed arrays (GetArray / SetArray: dtype, shape,
// byte order and raw bytes, chunked above the inline limit), objects made and
// deleted by class name (CreateObject / DeleteObject). It never sends pickle.
// Every call goes to the backend you connected to, which forwards it to the
// object's owner, so one reachable address is enough.

const fs = require('fs');
const os = require('os');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const TOKEN_HEADER = 'claypot-token';
const ERROR_CODE_HEADER = 'claypot-error-code';
const REMOTE_TYPE_HEADER = 'claypot-remote-type';
// Arrays up to this many bytes ride inside their header message; larger ones
// are sent in CHUNK_BYTES pieces (the backend's defaults: 1 MiB and 4 MiB).
const INLINE_LIMIT = 1024 * 1024;
const CHUNK_BYTES = 4 * 1024 * 1024;
// A chunked array's deadline grows by one second per this many bytes
// (claypot's CLAYPOT_STREAM_MIN_RATE default).
const STREAM_MIN_RATE = 50 * 1024 * 1024;

// The gRPC status each error code ends a call with (the README's error table).
const STATUS_BY_CODE = Object.freeze({
  ClaypotError: 'INTERNAL',
  ConfigurationError: 'INVALID_ARGUMENT',
  AuthenticationError: 'UNAUTHENTICATED',
  ProtocolError: 'INVALID_ARGUMENT',
  SerializationError: 'INVALID_ARGUMENT',
  ClassNotFound: 'FAILED_PRECONDITION',
  ValueTooLarge: 'RESOURCE_EXHAUSTED',
  ObjectError: 'FAILED_PRECONDITION',
  ObjectNotFound: 'NOT_FOUND',
  ObjectMoved: 'NOT_FOUND',
  AliasNotFound: 'NOT_FOUND',
  AliasExists: 'ALREADY_EXISTS',
  NotPersistent: 'FAILED_PRECONDITION',
  AlreadyPersistent: 'ALREADY_EXISTS',
  ObjectCorrupt: 'DATA_LOSS',
  ObjectBusy: 'FAILED_PRECONDITION',
  InvalidKey: 'INVALID_ARGUMENT',
  NotAVersion: 'FAILED_PRECONDITION',
  FeatureUnavailable: 'UNIMPLEMENTED',
  BackendError: 'UNAVAILABLE',
  BackendNotFound: 'NOT_FOUND',
  BackendUnavailable: 'UNAVAILABLE',
  BackendDown: 'UNAVAILABLE',
  CallInterrupted: 'ABORTED',
  StorageFailed: 'INTERNAL',
  DeadlineExceeded: 'DEADLINE_EXCEEDED',
  TaskError: 'ABORTED',
  TaskCancelled: 'CANCELLED',
  TaskTimeout: 'DEADLINE_EXCEEDED',
  CallCancelled: 'CANCELLED',
  RemoteError: 'UNKNOWN',
});

// The code of a gRPC failure that carries no claypot-error-code trailer
// (refused by the token check, or failed in transport).
const CODE_BY_STATUS = Object.freeze({
  UNAUTHENTICATED: 'AuthenticationError',
  DEADLINE_EXCEEDED: 'DeadlineExceeded',
  UNAVAILABLE: 'BackendUnavailable',
  RESOURCE_EXHAUSTED: 'ValueTooLarge',
  INVALID_ARGUMENT: 'ProtocolError',
});

// dtype name -> [TypedArray constructor, bytes per element of the dtype].
// Types JavaScript has no array for travel as their raw bits: float16 as
// Uint16Array, bool as Uint8Array, complex as interleaved (re, im) floats.
const DTYPES = Object.freeze({
  bool: [Uint8Array, 1],
  int8: [Int8Array, 1],
  uint8: [Uint8Array, 1],
  int16: [Int16Array, 2],
  uint16: [Uint16Array, 2],
  int32: [Int32Array, 4],
  uint32: [Uint32Array, 4],
  int64: [BigInt64Array, 8],
  uint64: [BigUint64Array, 8],
  float16: [Uint16Array, 2],
  float32: [Float32Array, 4],
  float64: [Float64Array, 8],
  complex64: [Float32Array, 8],
  complex128: [Float64Array, 16],
});

const DTYPE_OF_ARRAY = new Map([
  [Int8Array, 'int8'], [Uint8Array, 'uint8'], [Uint8ClampedArray, 'uint8'],
  [Int16Array, 'int16'], [Uint16Array, 'uint16'], [Int32Array, 'int32'],
  [Uint32Array, 'uint32'], [BigInt64Array, 'int64'], [BigUint64Array, 'uint64'],
  [Float32Array, 'float32'], [Float64Array, 'float64'],
]);

const NATIVE_ORDER = os.endianness() === 'LE' ? 'BYTE_ORDER_LITTLE_ENDIAN'
  : 'BYTE_ORDER_BIG_ENDIAN';

/** An error from claypot: `code` is a store.errors class name (or RemoteError). */
class ClaypotError extends Error {
  constructor(code, message, { grpcCode, remoteType, traceback } = {}) {
    super(message);
    this.name = 'ClaypotError';
    this.code = code;
    this.grpcStatus = STATUS_BY_CODE[code] || 'UNKNOWN';
    this.grpcCode = grpcCode !== undefined ? grpcCode : grpc.status[this.grpcStatus];
    this.remoteType = remoteType || '';
    this.traceback = traceback || '';
  }
}

function protoPath() {
  // Packed: the copy inside the package; in the repository: the one contract.
  const packed = path.join(__dirname, 'proto', 'claypot.proto');
  if (fs.existsSync(packed)) return packed;
  const repo = path.join(__dirname, '..', '..', 'proto', 'claypot.proto');
  if (fs.existsSync(repo)) return repo;
  throw new Error('claypot-client: proto/claypot.proto is missing from the package');
}

let service = null;
function loadService() {
  if (service === null) {
    const definition = protoLoader.loadSync(protoPath(), {
      keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
    });
    service = grpc.loadPackageDefinition(definition).claypot.v1.Backend;
  }
  return service;
}

function fromGrpcError(err) {
  const trailers = err.metadata ? err.metadata.getMap() : {};
  const statusName = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
  const code = trailers[ERROR_CODE_HEADER] ? String(trailers[ERROR_CODE_HEADER])
    : (CODE_BY_STATUS[statusName] || 'ClaypotError');
  const details = err.details || err.message;
  const prefix = `${code}: `;
  const message = details.startsWith(prefix) ? details.slice(prefix.length) : details;
  return new ClaypotError(code, message, {
    grpcCode: err.code,
    remoteType: trailers[REMOTE_TYPE_HEADER] ? String(trailers[REMOTE_TYPE_HEADER]) : '',
  });
}

function fromReplyError(error) {
  return new ClaypotError(error.code, error.message, {
    remoteType: error.remote_type, traceback: error.traceback,
  });
}

function targetOf(target) {
  if (typeof target === 'string') return { alias: target };
  if (target && typeof target.objectId === 'string') return { object_id: target.objectId };
  throw new TypeError('target must be an alias (string) or an ObjectRef from getByAlias/createObject');
}

function refOf(ref) {
  return { objectId: ref.object_id, classKey: ref.class_key, backendId: ref.backend_id };
}

function checkJson(value, what) {
  const text = JSON.stringify(value);
  if (text === undefined) throw new TypeError(`${what} is not JSON-encodable`);
  return text;
}

/** A received TypedArray message plus its bytes as { dtype, shape, data }. */
function decodeArray(header, bytes) {
  const entry = DTYPES[header.dtype];
  if (!entry) throw new ClaypotError('ProtocolError', `unknown dtype ${header.dtype}`);
  const [Ctor] = entry;
  if (bytes.length !== Number(header.nbytes)) {
    throw new ClaypotError('ProtocolError',
      `array data has ${bytes.length} bytes, the header announced ${header.nbytes}`);
  }
  // A fresh, aligned ArrayBuffer: received Buffers may sit at any offset of a pool.
  const buffer = new ArrayBuffer(bytes.length);
  const view = new Uint8Array(buffer);
  view.set(bytes);
  const order = header.byte_order === 'BYTE_ORDER_UNSPECIFIED' ? 'BYTE_ORDER_LITTLE_ENDIAN'
    : header.byte_order;
  const lane = Ctor.BYTES_PER_ELEMENT;
  if (lane > 1 && order !== NATIVE_ORDER) swapBytes(view, lane);
  const data = new Ctor(buffer, 0, bytes.length / lane);
  return { dtype: header.dtype, shape: header.shape.map(Number), data };
}

function swapBytes(view, lane) {
  for (let i = 0; i < view.length; i += lane) {
    for (let a = i, b = i + lane - 1; a < b; a++, b--) {
      const t = view[a]; view[a] = view[b]; view[b] = t;
    }
  }
}

/** { dtype, shape, bytes } of a TypedArray or an { data, shape, dtype? } NDArray. */
function encodeArray(value) {
  let data; let shape; let dtype;
  if (ArrayBuffer.isView(value) && !(value instanceof DataView)) {
    data = value;
  } else if (value && ArrayBuffer.isView(value.data)) {
    ({ data, shape, dtype } = value);
  } else {
    throw new TypeError('setArray needs a TypedArray or { data: TypedArray, shape, dtype? }');
  }
  dtype = dtype || DTYPE_OF_ARRAY.get(data.constructor);
  const entry = DTYPES[dtype];
  if (!entry) throw new TypeError(`no dtype for ${data.constructor.name}; pass { dtype }`);
  if (!(data instanceof entry[0])) {
    throw new TypeError(`dtype ${dtype} needs a ${entry[0].name}, not a ${data.constructor.name}`);
  }
  const itemSize = entry[1];
  const count = data.byteLength / itemSize;
  shape = shape ? shape.map(Number) : [count];
  if (shape.reduce((a, b) => a * b, 1) !== count) {
    throw new TypeError(`shape [${shape}] does not hold ${count} elements of ${dtype}`);
  }
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return { dtype, shape, bytes };
}

// True once `channel` is READY; false at its first failure to connect (a
// refused or unresolvable address: grpc's own waitForReady would keep
// retrying until the deadline) or at the deadline.
function connected(channel, deadline) {
  const { READY, TRANSIENT_FAILURE, SHUTDOWN } = grpc.connectivityState;
  return new Promise((resolve) => {
    const check = () => {
      const state = channel.getConnectivityState(true);
      if (state === READY) resolve(true);
      else if (state === TRANSIENT_FAILURE || state === SHUTDOWN) resolve(false);
      else channel.watchConnectivityState(state, deadline, (err) => (err ? resolve(false) : check()));
    };
    check();
  });
}

/** A connection to a claypot cluster through one backend. Make it with connect(). */
class Client {
  constructor(address, options = {}) {
    this.address = address;
    this.token = options.token !== undefined ? options.token : (process.env.CLAYPOT_TOKEN || '');
    this.timeout = options.timeout || 10;
    this.callTimeout = options.callTimeout || 600;
    this._credentials = options.ca
      ? grpc.credentials.createSsl(Buffer.isBuffer(options.ca) ? options.ca : Buffer.from(options.ca))
      : grpc.credentials.createInsecure();
    this._stub = this._newStub(address);
    // direct: typed arrays go straight to the object's owner (its registered
    // address), not through the backend connected to; caches below.
    this.direct = Boolean(options.direct);
    this._owners = new Map();     // alias -> backend id
    this._addresses = new Map();  // backend id -> address
    this._ownerStubs = new Map(); // address -> stub
  }

  _newStub(address) {
    const Backend = loadService();
    return new Backend(address, this._credentials, {
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      'grpc.max_send_message_length': 64 * 1024 * 1024,
    });
  }

  /** Where the object lives: { backendId, address } (one Resolve, then cached). */
  async locate(target) {
    let backendId;
    if (typeof target === 'string') {
      backendId = this._owners.get(target);
      if (backendId === undefined) {
        backendId = (await this.getByAlias(target)).backendId;
        this._owners.set(target, backendId);
      }
    } else {
      targetOf(target); // a TypeError for anything but an ObjectRef here
      backendId = target.backendId;
      if (!backendId) backendId = (await this.getById(target.objectId)).backendId;
    }
    if (!this._addresses.has(backendId)) {
      for (const b of await this.backends()) this._addresses.set(b.backendId, b.address);
    }
    return { backendId, address: this._addresses.get(backendId) || '' };
  }

  // The stub of the target's owner in direct mode, or null (use the gateway).
  async _ownerStub(target) {
    if (!this.direct) return null;
    let where;
    try {
      where = await this.locate(target);
    } catch (err) {
      return null; // the gateway gives the same error, with its status
    }
    if (!where.address || where.address === this.address) return null;
    let stub = this._ownerStubs.get(where.address);
    if (stub === undefined) {
      // Connect first, within the directory timeout: an address that does not
      // answer here (NAT, a container's name) must not hold a call for its
      // whole deadline. Unreachable addresses are remembered as null.
      const candidate = this._newStub(where.address);
      const ready = await connected(candidate.getChannel(), this._deadline(this.timeout));
      if (ready) {
        stub = candidate;
      } else {
        candidate.close();
        stub = null;
      }
      this._ownerStubs.set(where.address, stub);
    }
    return stub;
  }

  // Direct first, then the gateway when the owner did not run it: NOT_FOUND
  // (moved or gone: routing tables are stale) or, for operations that are
  // safe to repeat, UNAVAILABLE (the owner's address does not answer here).
  async _routed(target, repeatable, run) {
    const stub = await this._ownerStub(target);
    if (stub !== null) {
      try {
        return await run(stub);
      } catch (err) {
        const stale = err instanceof ClaypotError && (err.grpcStatus === 'NOT_FOUND'
          || (repeatable && err.grpcStatus === 'UNAVAILABLE'));
        if (!stale) throw err;
        if (typeof target === 'string') this._owners.delete(target);
        this._addresses.clear();
      }
    }
    return run(this._stub);
  }

  _metadata() {
    const md = new grpc.Metadata();
    if (this.token) md.set(TOKEN_HEADER, this.token);
    return md;
  }

  _deadline(seconds) {
    return new Date(Date.now() + seconds * 1000);
  }

  _unary(method, request, seconds) {
    return new Promise((resolve, reject) => {
      this._stub[method](request, this._metadata(), { deadline: this._deadline(seconds) },
        (err, reply) => (err ? reject(fromGrpcError(err)) : resolve(reply)));
    });
  }

  /** Identity of the backend connected to (needs no token). */
  async ping() {
    const r = await this._unary('Ping', {}, this.timeout);
    return { backendId: r.backend_id, address: r.address, host: r.host, pid: Number(r.pid) };
  }

  /** The ObjectRef of the object that holds `alias`. */
  async getByAlias(alias) {
    const reply = await this._unary('Resolve', { alias }, this.timeout);
    if (reply.error && reply.error.code) throw fromReplyError(reply.error);
    return refOf(reply.ref);
  }

  /** The ObjectRef of the object with id `objectId`. */
  async getById(objectId) {
    const reply = await this._unary('Resolve', { object_id: objectId }, this.timeout);
    if (reply.error && reply.error.code) throw fromReplyError(reply.error);
    return refOf(reply.ref);
  }

  async _json(target, kind, name, argsJson, kwargsJson) {
    const reply = await this._unary('CallJson', {
      ...targetOf(target), kind, name, args_json: argsJson, kwargs_json: kwargsJson,
    }, this.callTimeout);
    if (reply.error && reply.error.code) throw fromReplyError(reply.error);
    return reply.result_json === '' ? null : JSON.parse(reply.result_json);
  }

  /**
   * Run method `name` with positional `args` and keyword `kwargs` (JSON values).
   * With `{ array: true }` the result must be a numpy array and comes back as an NDArray.
   */
  async call(target, name, args = [], kwargs = {}, options = {}) {
    if (!Array.isArray(args)) throw new TypeError('args must be an array (positional arguments)');
    if (kwargs === null || typeof kwargs !== 'object' || Array.isArray(kwargs)) {
      throw new TypeError('kwargs must be a plain object (keyword arguments)');
    }
    const argsJson = checkJson(args, 'args');
    const kwargsJson = Object.keys(kwargs).length ? checkJson(kwargs, 'kwargs') : '';
    if (options.array) {
      const request = { ...targetOf(target), kind: 'METHOD', name,
        args_json: argsJson, kwargs_json: kwargsJson };
      return this._routed(target, false, (stub) => this._getArray(request, stub));
    }
    return this._json(target, 'METHOD', name, argsJson, kwargsJson);
  }

  /**
   * Read attribute `name`: a JSON value, or an NDArray when it is a numpy array.
   * `{ array: true }` asks for the array form at once (one round trip).
   */
  async get(target, name, options = {}) {
    if (options.array) return this.getArray(target, name);
    try {
      return await this._json(target, 'GET_ATTR', name, '', '');
    } catch (err) {
      // A numpy array is not JSON: read it again as a typed array (reads change nothing).
      if (err instanceof ClaypotError && err.code === 'SerializationError'
          && options.array !== false) {
        return this.getArray(target, name);
      }
      throw err;
    }
  }

  /** Read numpy attribute `name` as { dtype, shape, data: TypedArray }. */
  getArray(target, name) {
    const request = { ...targetOf(target), kind: 'GET_ATTR', name };
    return this._routed(target, true, (stub) => this._getArray(request, stub));
  }

  _getArray(request, stub) {
    return new Promise((resolve, reject) => {
      const call = stub.GetArray(request, this._metadata(),
        { deadline: this._deadline(this.callTimeout) });
      let header = null;
      const parts = [];
      let failed = false;
      const fail = (err) => {
        if (!failed) { failed = true; call.cancel(); reject(err); }
      };
      call.on('data', (message) => {
        if (message.part === 'array') {
          if (header !== null) fail(new ClaypotError('ProtocolError', 'a second array header'));
          header = message.array;
        } else if (message.part === 'data') {
          if (header === null) fail(new ClaypotError('ProtocolError', 'data before the header'));
          parts.push(message.data);
        }
      });
      call.on('error', (err) => fail(fromGrpcError(err)));
      call.on('end', () => {
        if (failed) return;
        if (header === null) {
          fail(new ClaypotError('ProtocolError', 'GetArray answered without an array'));
          return;
        }
        try {
          const bytes = header.chunked ? Buffer.concat(parts) : header.data;
          resolve(decodeArray(header, bytes));
        } catch (err) {
          reject(err);
        }
      });
    });
  }

  /**
   * Write attribute `name`. A TypedArray (or { data, shape, dtype? }) becomes a
   * numpy array; anything else is sent as JSON.
   */
  async set(target, name, value) {
    if (ArrayBuffer.isView(value) || (value && ArrayBuffer.isView(value.data))) {
      await this.setArray(target, name, value);
      return;
    }
    await this._json(target, 'SET_ATTR', name, checkJson(value, 'value'), '');
  }

  /** Write a TypedArray (or { data, shape, dtype? }) into attribute `name` as a numpy array. */
  setArray(target, name, value) {
    const encoded = encodeArray(value);
    return this._routed(target, true, (stub) => this._setArray(stub, target, name, encoded));
  }

  _setArray(stub, target, name, { dtype, shape, bytes }) {
    const chunked = bytes.length > INLINE_LIMIT;
    const header = {
      ...targetOf(target), name,
      array: { dtype, shape, byte_order: NATIVE_ORDER, nbytes: bytes.length,
        data: chunked ? Buffer.alloc(0) : bytes, chunked },
    };
    const seconds = this.timeout + bytes.length / STREAM_MIN_RATE;
    return new Promise((resolve, reject) => {
      const call = stub.SetArray(this._metadata(), { deadline: this._deadline(seconds) },
        (err, reply) => (err ? reject(fromGrpcError(err)) : resolve(refOf(reply.ref))));
      const pieces = [{ header }];
      if (chunked) {
        for (let at = 0; at < bytes.length; at += CHUNK_BYTES) {
          pieces.push({ data: bytes.subarray(at, at + CHUNK_BYTES) });
        }
      }
      let next = 0;
      // Respect back-pressure: write until the stream asks us to wait for 'drain'.
      const pump = () => {
        while (next < pieces.length) {
          if (!call.write(pieces[next++])) {
            call.once('drain', pump);
            return;
          }
        }
        call.end();
      };
      pump();
    });
  }

  /**
   * Make an object of a class the cluster knows (a registry key, "module:Qualname"
   * or "Qualname") with JSON constructor arguments, and make it persistent.
   */
  async createObject(className, args = [], kwargs = {}, options = {}) {
    if (!Array.isArray(args)) throw new TypeError('args must be an array');
    const reply = await this._unary('CreateObject', {
      class_name: className,
      args_json: checkJson(args, 'args'),
      kwargs_json: Object.keys(kwargs || {}).length ? checkJson(kwargs, 'kwargs') : '',
      alias: options.alias || '',
      backend_id: options.backend || '',
    }, this.callTimeout);
    return refOf(reply.ref);
  }

  /** Delete the object (by alias or ObjectRef) wherever it lives. */
  async delete(target) {
    await this._unary('DeleteObject', targetOf(target), this.timeout);
  }

  /** Every backend of the cluster, with up/down and load. */
  async backends() {
    const reply = await this._unary('ListBackends', {}, this.timeout);
    return reply.backends.map((b) => ({
      backendId: b.backend_id, address: b.address, host: b.host, pid: Number(b.pid),
      up: b.up, objects: Number(b.objects), memoryBytes: Number(b.memory_bytes),
      residentObjects: Number(b.resident_objects), runningTasks: Number(b.running_tasks),
    }));
  }

  /** Close the connection. */
  close() {
    this._stub.close();
    for (const stub of this._ownerStubs.values()) if (stub !== null) stub.close();
    this._ownerStubs.clear();
  }
}

/**
 * Connect to a cluster through the backend at `address` (default CLAYPOT_ADDRESS).
 * Resolves once that backend answered a Ping within `options.timeout` seconds.
 */
async function connect(address, options = {}) {
  const where = address || process.env.CLAYPOT_ADDRESS;
  if (!where) {
    throw new ClaypotError('ConfigurationError', 'no address: pass one or set CLAYPOT_ADDRESS');
  }
  const client = new Client(where, options);
  try {
    await client.ping();
  } catch (err) {
    client.close();
    throw err;
  }
  return client;
}

module.exports = {
  connect, Client, ClaypotError, STATUS_BY_CODE, DTYPES: Object.keys(DTYPES),
};
