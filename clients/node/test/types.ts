// Compiled with `tsc --noEmit -p test` (tests/test_node_client.py): the type
// definitions describe a real session, and misuse does not type-check.
import { connect, ClaypotError, NDArray, ObjectRef, STATUS_BY_CODE } from '..';

async function session(address: string, token: string): Promise<number> {
  const client = await connect(address, { token, timeout: 5, callTimeout: 60 });
  try {
    const ref: ObjectRef = await client.getByAlias('counter');
    const n = await client.call(ref, 'incr', [2], { by: 1 });
    const samples: NDArray = await client.getArray('field', 'samples');
    const scaled: NDArray = await client.call('field', 'scaled', [2], {}, { array: true });
    await client.set(ref, 'label', { tags: ['x'] });
    await client.setArray('field', 'grid', { data: new Float32Array(6), shape: [2, 3] });
    const made = await client.createObject('Counter', [1], {}, { alias: 'c2' });
    await client.delete(made);
    const up = (await client.backends()).filter((b) => b.up).length;
    // @ts-expect-error positional arguments are an array
    await client.call(ref, 'incr', 2);
    // @ts-expect-error a target is an alias or an ObjectRef
    await client.get(42, 'value');
    return Number(n) + samples.shape[0] + scaled.data.length + up;
  } catch (err) {
    if (err instanceof ClaypotError && err.code === 'AliasNotFound') {
      return STATUS_BY_CODE[err.code] === 'NOT_FOUND' ? -1 : -2;
    }
    throw err;
  } finally {
    client.close();
  }
}

export default session;
