/** Pipes messages as dagster-pipes writes them, byte for byte, and the context's checks. */
import assert from 'node:assert/strict';
import {test} from 'node:test';

import {Cancellation} from '../src/cancellation';
import {DagsterPipesError, PipesContext, PipesContextData, SessionCancelled, pipesException} from '../src/context';
import {PipesMessage, openedExtras} from '../src/messageWriter';
import {COMPACT, dumps} from '../src/pyjson';
import {python} from './fixtures';

class Capture {
  encoded: string[] = [];
  write(message: PipesMessage): void {
    this.encoded.push(dumps(message, {separators: COMPACT}));
  }
}

function context(data: Partial<PipesContextData> = {}): {pipes: PipesContext; sink: Capture; cancellation: Cancellation} {
  const sink = new Capture();
  const cancellation = new Cancellation();
  const pipes = new PipesContext({...python.pipes_context_data, ...data}, sink, cancellation);
  return {pipes, sink, cancellation};
}

test('the same calls write the same bytes as dagster-pipes', async () => {
  const {pipes, sink} = context();
  pipes.open(openedExtras(python.replies.invocation, '4bf92f3577b34da6a3ce929d0e0e4736'));
  pipes.log.debug('debug line');
  pipes.log.info('writing %s rows', '\u00e9');
  pipes.log.warning('careful');
  pipes.log.error('bad');
  pipes.log.critical('worse');
  pipes.reportAssetMaterialization({
    metadata: {
      rows: {raw_value: 3, type: 'int'},
      path: 'gs://lake/orders',
      ratio: 0.5,
      flag: true,
      nothing: null,
      list: [1, 'a'],
      schema: {raw_value: {id: 'int'}, type: 'json'},
      total: {raw_value: 12, type: 'float'}, // Dagster's float metadata takes no int: written 12.0
    },
    dataVersion: 'v7',
    assetKey: 'sales/orders',
  });
  pipes.reportAssetCheck({checkName: 'rows_positive', passed: true, severity: 'WARN', metadata: {n: 1}, assetKey: 'sales/returns'});
  pipes.reportAssetCheck({checkName: 'no_nulls', passed: false, assetKey: 'sales/orders'});
  pipes.reportAssetMaterialization({assetKey: 'sales/returns', metadata: {}});
  pipes.reportCustomMessage({k: [1, 2.5, null, '\u00fc'], n: {deep: true}});
  pipes.logExternalStream('stdout', 'printed line\n');
  pipes.logExternalStream('stderr', 'oops\n', {x: 1});
  await pipes.close();
  assert.deepEqual(sink.encoded, python.pipes_messages);
  assert.deepEqual(openedExtras(python.replies.invocation, undefined), python.opened_extras.without_trace);
  assert.deepEqual(openedExtras(python.replies.invocation, '4bf92f3577b34da6a3ce929d0e0e4736'), python.opened_extras.with_trace);
  const {token, extras} = python.opened_extras.with_owner_token;
  assert.deepEqual(openedExtras(python.replies.invocation, '4bf92f3577b34da6a3ce929d0e0e4736', token), extras);
});

test("closed: the lease is ended first, and closed says so as the Python side's context does", async () => {
  const timeout = {message: 'SessionTimeout: late\n', stack: [], name: 'SessionTimeout', cause: null, context: null};
  for (const [ended, exception, expected] of [
    [true, timeout, python.closed.lease_ended],
    [false, null, python.closed.lease_not_ended],
  ] as const) {
    const sink = new Capture();
    let release: (ended: boolean) => void = () => {};
    const pipes = new PipesContext(python.pipes_context_data, sink, new Cancellation(), () => new Promise((resolve) => (release = resolve)));
    const first = pipes.close(exception);
    const second = pipes.close(); // the handler's end, while the deadline's close ends the lease: waits for it
    pipes.log.info('written while the lease is ended'); // still before `closed`
    assert.equal(pipes.isClosed, false);
    release(ended);
    await Promise.all([first, second]);
    assert.equal(sink.encoded.length, 2);
    assert.match(sink.encoded[0], /"method":"log"/);
    assert.equal(sink.encoded[1], expected);
    assert.throws(() => pipes.log.info('late'), DagsterPipesError);
  }
});

test("the step's context, as dagster-pipes reads it", () => {
  const {pipes} = context();
  assert.deepEqual(pipes.assetKeys, ['sales/orders', 'sales/returns']);
  assert.throws(() => pipes.assetKey, /targets multiple assets/);
  assert.equal(pipes.partitionKey, '2026-01-01');
  assert.deepEqual(pipes.partitionKeyRange, {start: '2026-01-01', end: '2026-01-01'});
  assert.equal(pipes.partitionTimeWindow?.start, '2026-01-01T00:00:00+00:00');
  assert.equal(pipes.isPartitionStep, true);
  assert.deepEqual(pipes.codeVersionByAssetKey, {'sales/orders': 'v1', 'sales/returns': null});
  assert.equal(pipes.runId, 'run-1');
  assert.equal(pipes.jobName, 'job');
  assert.equal(pipes.retryNumber, 0);
  assert.equal(pipes.getExtra('region'), 'emea');
  assert.throws(() => pipes.getExtra('nope'), /Extra `nope` is undefined/);

  const single = context({asset_keys: ['a'], partition_key: null, partition_key_range: null, partition_time_window: null}).pipes;
  assert.equal(single.assetKey, 'a');
  assert.equal(single.isPartitionStep, false);
  assert.throws(() => single.partitionKey, /does not target any partitions/);
});

test('reports the orchestrator could not take are refused where they are made', async () => {
  const {pipes} = context();
  assert.throws(() => pipes.reportAssetMaterialization(), /targets multiple assets: pass assetKey/);
  assert.throws(() => pipes.reportAssetMaterialization({assetKey: 'other'}), /Invalid asset key/);
  assert.throws(() => pipes.reportAssetMaterialization({assetKey: 'sales/orders', metadata: {x: {a: 1}}}), /wrap an object value/);
  assert.throws(
    () => pipes.reportAssetMaterialization({assetKey: 'sales/orders', metadata: {x: {raw_value: 1, type: 'integer'}}}),
    /metadata\.x\.type/,
  );
  pipes.reportAssetMaterialization({assetKey: 'sales/orders'});
  assert.throws(() => pipes.reportAssetMaterialization({assetKey: 'sales/orders'}), /already been materialized/);
  assert.throws(
    // @ts-expect-error: a severity Dagster does not know
    () => pipes.reportAssetCheck({checkName: 'c', passed: true, severity: 'FATAL', assetKey: 'sales/orders'}),
    /Expected "WARN" or "ERROR"/,
  );
  const none = context({asset_keys: null}).pipes;
  assert.throws(() => none.reportAssetMaterialization(), /does not target a specific asset/);
  await pipes.close();
  assert.throws(() => pipes.log.info('late'), DagsterPipesError);
});

test('cancellation: isCancelled, raiseIfCancelled, the signal', () => {
  const {pipes, cancellation} = context();
  assert.equal(pipes.isCancelled, false);
  pipes.raiseIfCancelled();
  cancellation.set('the run was terminated');
  cancellation.set('a second reason is ignored');
  assert.equal(pipes.isCancelled, true);
  assert.equal(pipes.signal.aborted, true);
  assert.throws(() => pipes.raiseIfCancelled(), (e: unknown) => e instanceof SessionCancelled && /the run was terminated$/.test(e.message));
});

test("the closed message's exception: name, message, V8 frames, the cause chain", () => {
  function failing(): never {
    throw new TypeError('inner');
  }
  let error: unknown;
  try {
    try {
      failing();
    } catch (inner) {
      throw new Error('outer', {cause: inner});
    }
  } catch (e) {
    error = e;
  }
  const exception = pipesException(error);
  assert.equal(exception.message, 'Error: outer\n');
  assert.equal(exception.name, 'Error');
  assert.ok(exception.stack.length > 0 && exception.stack.every((f) => f.startsWith('  at ') && f.endsWith('\n')));
  assert.equal(exception.cause?.message, 'TypeError: inner\n');
  assert.match(exception.cause!.stack.at(-1)!, /at failing/); // outermost first: where it was thrown last
  assert.equal(exception.context, null);
  assert.deepEqual(pipesException('a string'), {message: 'a string\n', stack: [], name: null, cause: null, context: null});
});
