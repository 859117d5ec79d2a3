'use strict';
// The Node client against a real cluster: test/cluster.py (an embedded Redis
// and two backend processes) is started here and stopped at the end.
// CLAYPOT_PYTHON names the Python that has claypot installed (default python3).

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const path = require('node:path');
const readline = require('node:readline');

const claypot = require('..');

let cluster = null;
let info = null;
let client = null;

function startCluster() {
  const python = process.env.CLAYPOT_PYTHON || 'python3';
  const child = spawn(python, [path.join(__dirname, 'cluster.py')],
    { stdio: ['pipe', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill();
      reject(new Error('the cluster did not start within 60 s'));
    }, 60000);
    child.on('error', (err) => { clearTimeout(timer); reject(err); });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`cluster.py exited with ${code} before it was ready`));
    });
    readline.createInterface({ input: child.stdout }).once('line', (line) => {
      clearTimeout(timer);
      child.removeAllListeners('exit');
      resolve({ child, info: JSON.parse(line) });
    });
  });
}

before(async () => {
  ({ child: cluster, info } = await startCluster());
  client = await claypot.connect(info.address, { token: info.token, timeout: 10 });
});

after(async () => {
  if (client) client.close();
  if (cluster) {
    const exited = new Promise((resolve) => cluster.once('exit', resolve));
    cluster.stdin.end(); // cluster.py stops its backends and Redis when stdin closes
    const timer = setTimeout(() => cluster.kill('SIGTERM'), 30000);
    await exited;
    clearTimeout(timer);
  }
});

test('connect pings the backend and lists the cluster', async () => {
  const me = await client.ping();
  assert.equal(me.backendId, info.gateway);
  const backends = await client.backends();
  assert.deepEqual(backends.map((b) => b.backendId).sort(), [info.gateway, info.owner].sort());
  assert.ok(backends.every((b) => b.up && b.pid > 0 && b.address.includes(':')));
  const owner = backends.find((b) => b.backendId === info.owner);
  // Counts come with the backends' heartbeats, so they may lag a persist by a beat.
  assert.ok(Number.isInteger(owner.objects) && owner.memoryBytes > 0);
});

test('getByAlias, call with args and kwargs, get and set JSON values', async () => {
  const ref = await client.getByAlias('counter');
  assert.equal(ref.backendId, info.owner);
  assert.match(ref.classKey, /Counter#/);
  const before = await client.get(ref, 'value');
  assert.equal(await client.call(ref, 'incr', [2]), before + 2);
  assert.equal(await client.call('counter', 'incr', [], { by: 3 }), before + 5);
  assert.deepEqual(await client.call(ref, 'explain'),
    { value: before + 5, label: 'counter', tags: ['a', 'b'], ok: true });
  await client.set(ref, 'label', { name: 'from node', n: [1, 2] });
  assert.deepEqual(await client.get('counter', 'label'), { name: 'from node', n: [1, 2] });
  assert.deepEqual(await client.getById(ref.objectId), ref);
});

test('numpy attributes arrive as TypedArrays with dtype and shape', async () => {
  const samples = await client.get('field', 'samples'); // 8 MB: chunked on the wire
  assert.equal(samples.dtype, 'float64');
  assert.deepEqual(samples.shape, [1000000]);
  assert.ok(samples.data instanceof Float64Array);
  for (const i of [0, 1, 4095, 524288, 999999]) assert.equal(samples.data[i], i * 0.5);

  const counts = await client.getArray('field', 'counts');
  assert.ok(counts.data instanceof BigInt64Array);
  assert.deepEqual(counts.shape, [3, 4]);
  assert.equal(counts.data[0], -6n);
  assert.equal(counts.data[11], 5n);

  const be = await client.get('field', 'big_endian', { array: true });
  assert.ok(be.data instanceof Int32Array);
  assert.deepEqual(Array.from(be.data), [0, 1000, 2000, 3000, 4000]);

  const flags = await client.getArray('field', 'flags');
  assert.equal(flags.dtype, 'bool');
  assert.deepEqual(Array.from(flags.data), [1, 0, 1]);

  const scaled = await client.call('field', 'scaled', [4], { offset: 1 }, { array: true });
  assert.equal(scaled.data.length, 1000000);
  assert.equal(scaled.data[999999], 999999 * 2 + 1);
});

test('TypedArrays written from Node are numpy arrays in Python', async () => {
  const grid = new Float32Array([1.5, 2.5, 3.5, 4.5, 5.5, 6.5]);
  await client.set('field', 'grid', { data: grid, shape: [3, 2] });
  assert.deepEqual(await client.call('field', 'describe', ['grid']),
    { dtype: 'float32', shape: [3, 2], native: true, sum: 24, first: 1.5, last: 6.5 });
  const back = await client.getArray('field', 'grid');
  assert.deepEqual(back.shape, [3, 2]);
  assert.deepEqual(Array.from(back.data), Array.from(grid));

  // 6 MB: streamed in chunks.
  const big = new Float64Array(750000).map((_, i) => i * 0.25 - 7);
  await client.set('field', 'samples', big);
  const seen = await client.call('field', 'describe', ['samples']);
  assert.deepEqual(seen.shape, [750000]);
  assert.equal(seen.first, -7);
  assert.equal(seen.last, 749999 * 0.25 - 7);
  const roundTrip = await client.getArray('field', 'samples');
  assert.ok(Buffer.from(roundTrip.data.buffer).equals(Buffer.from(big.buffer)));

  const ints = new BigInt64Array([1n, -2n, 3n]);
  await client.set('field', 'counts', ints);
  assert.deepEqual(await client.call('field', 'describe', ['counts']),
    { dtype: 'int64', shape: [3], native: true, sum: 2, first: 1, last: 3 });
});

test('direct: typed arrays go to the owner, and fall back when it moved', async () => {
  const direct = await claypot.connect(info.address, { token: info.token, direct: true });
  try {
    const owner = (await direct.backends()).find((b) => b.backendId === info.owner);
    assert.deepEqual(await direct.locate('field'), { backendId: info.owner, address: owner.address });
    const samples = await direct.getArray('field', 'samples');
    const viaGateway = await client.getArray('field', 'samples');
    assert.ok(Buffer.from(samples.data.buffer).equals(Buffer.from(viaGateway.data.buffer)));
    const grid = new Float64Array([9, 8, 7]);
    await direct.set('field', 'grid', grid);
    assert.deepEqual(Array.from((await client.getArray('field', 'grid')).data), [9, 8, 7]);
    const halves = await direct.call('field', 'scaled', [0.5], {}, { array: true });
    assert.equal(halves.data.length, samples.data.length);

    // A stale route (the alias now names an object on the other backend) still
    // answers: every backend forwards to the owner.
    const alias = `moving-${process.pid}`;
    const first = await direct.createObject('Field', [2], {}, { alias, backend: info.owner });
    assert.equal((await direct.locate(alias)).backendId, info.owner);
    await direct.delete(first);
    await direct.createObject('Field', [4], {}, { alias });          // on the gateway now
    assert.deepEqual(Array.from((await direct.getArray(alias, 'samples')).data), [0, 0.5, 1, 1.5]);
    await direct.delete(alias);

    // An owner address that does not answer from here (NAT, a container name):
    // reads and writes fall back to the backend connected to.
    direct._addresses.set(info.owner, '127.0.0.1:1');
    const fallback = await direct.getArray('field', 'grid');
    assert.deepEqual(Array.from(fallback.data), [9, 8, 7]);
  } finally {
    direct.close();
  }
});

test('createObject of a class the cluster knows, then delete', async () => {
  const ref = await client.createObject('Counter', [40], { label: 'made in node' },
    { alias: `node-${process.pid}` });
  assert.equal(ref.backendId, info.gateway);
  assert.equal(await client.call(ref, 'incr', [2]), 42);
  assert.equal(await client.get(`node-${process.pid}`, 'label'), 'made in node');
  const there = await client.createObject('Field', [3], {}, { backend: info.owner });
  assert.equal(there.backendId, info.owner);
  assert.deepEqual(Array.from((await client.getArray(there, 'samples')).data), [0, 0.5, 1]);

  await client.delete(`node-${process.pid}`);
  await client.delete(there);
  await assert.rejects(client.getByAlias(`node-${process.pid}`),
    (err) => err instanceof claypot.ClaypotError && err.code === 'AliasNotFound');
  await assert.rejects(client.get(there, 'samples'), { code: 'ObjectNotFound' });
});

test('errors carry the claypot code and the gRPC status of the table', async () => {
  await assert.rejects(client.call('counter', 'fail', ['no']), (err) => {
    assert.ok(err instanceof claypot.ClaypotError);
    assert.equal(err.code, 'RemoteError');
    assert.match(err.remoteType, /ValueError$/);
    assert.match(err.message, /refused: no/);
    return true;
  });
  await assert.rejects(client.getArray('no-such-alias', 'x'),
    { code: 'AliasNotFound', grpcStatus: 'NOT_FOUND', grpcCode: 5 });
  await assert.rejects(client.getArray('counter', 'label'),
    { code: 'SerializationError', grpcStatus: 'INVALID_ARGUMENT' });
  await assert.rejects(client.createObject('NoSuchClass'),
    { code: 'ClassNotFound', grpcStatus: 'FAILED_PRECONDITION' });
  await assert.rejects(client.call('counter', 'incr', { by: 1 }), TypeError);
  await assert.rejects(client.set('field', 'grid', { data: new Float32Array(5), shape: [2, 3] }),
    TypeError);

  const intruder = await claypot.connect(info.address, { token: 'wrong', timeout: 5 });
  try {
    await assert.rejects(intruder.getByAlias('counter'),
      { code: 'AuthenticationError', grpcStatus: 'UNAUTHENTICATED' });
  } finally {
    intruder.close();
  }
  await assert.rejects(claypot.connect('127.0.0.1:1', { timeout: 2 }),
    { code: 'BackendUnavailable' });
  for (const [code, status] of Object.entries(claypot.STATUS_BY_CODE)) {
    assert.equal(new claypot.ClaypotError(code, 'x').grpcStatus, status);
  }
});
