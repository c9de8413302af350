/** The reply writer: batches numbered from 0 (`opened` first, `closed` last), limits, heartbeats,
 * claim-check and signing. The publisher is the one boundary replaced: it records what would be published. */
import assert from 'node:assert/strict';
import {test} from 'node:test';

import {BlobStore} from '../src/claimCheck';
import {Publisher} from '../src/clients';
import {PipesMessage, ReplyWriter} from '../src/messageWriter';
import {Attributes, ReplyChannelParams, replyChannelParams} from '../src/protocol';
import {sleep} from '../src/retry';
import {signature} from '../src/signing';
import {python} from './fixtures';

const SESSION = '9f1c2e3d4c5b6a798877665544332211';
const INVOCATION = '0123456789abcdef0123456789abcdef';

interface Published {
  data: Buffer;
  attributes: Attributes;
}

class Recorder implements Publisher {
  published: Published[] = [];
  failWith: Error | null = null;
  async publish(_topic: string, data: Buffer, attributes: Attributes): Promise<string> {
    await sleep(1);
    if (this.failWith) throw this.failWith;
    this.published.push({data, attributes});
    return String(this.published.length);
  }
  batches(): PipesMessage[][] {
    return this.published.filter((p) => p.attributes.dagster_pipes_kind === 'batch').map((p) => JSON.parse(p.data.toString()));
  }
}

class MemoryStore implements BlobStore {
  objects = new Map<string, Buffer>();
  async put(key: string, data: Buffer): Promise<string> {
    this.objects.set(key, data);
    return `gs://pipes-payloads/${key}`;
  }
  async get(): Promise<Buffer> {
    throw new Error('not read here');
  }
}

function settings(overrides: Partial<ReplyChannelParams> = {}): ReplyChannelParams {
  return {
    ...replyChannelParams({topic: 'projects/p/topics/replies', session_id: SESSION, bucket: 'pipes-payloads', prefix: 'dagster-pipes'}),
    ...overrides,
  };
}

const message = (method: string, params: Record<string, unknown> = {}): PipesMessage => ({
  __dagster_pipes_version: '0.1',
  method,
  params,
});

function writer(overrides: Partial<ReplyChannelParams> = {}, signingSecret?: string) {
  const publisher = new Recorder();
  const store = new MemoryStore();
  const w = new ReplyWriter({publisher, blobStore: store, settings: settings(overrides), invocationId: INVOCATION, signingSecret});
  return {w, publisher, store};
}

test('batches: seq from 0, opened first, closed last, every message once and in order', async () => {
  const {w, publisher} = writer({max_batch_messages: 7});
  w.write(message('opened', {extras: {}}));
  w.start();
  for (let i = 0; i < 50; i++) {
    w.write(message('log', {message: `line ${i}`, level: 'INFO'}));
    if (i % 10 === 0) await sleep(2);
  }
  w.write(message('closed'));
  w.write(message('log', {message: 'after closed', level: 'INFO'})); // dropped
  await w.close();
  const batches = publisher.batches();
  assert.deepEqual(
    publisher.published.filter((p) => p.attributes.dagster_pipes_kind === 'batch').map((p) => p.attributes.dagster_pipes_seq),
    batches.map((_, i) => String(i)),
  );
  assert.ok(batches.every((b) => b.length <= 7));
  const all = batches.flat();
  assert.equal(all[0].method, 'opened');
  assert.equal(all.at(-1)!.method, 'closed');
  assert.deepEqual(all.slice(1, -1).map((m) => m.params!.message), Array.from({length: 50}, (_, i) => `line ${i}`));
  for (const p of publisher.published) {
    assert.equal(p.attributes.dagster_pipes_session, SESSION);
    assert.equal(p.attributes.dagster_pipes_invocation, INVOCATION);
    assert.equal(p.attributes.dagster_pipes_body, 'inline');
  }
});

test('max_batch_bytes cuts a batch (one message over it still goes, alone)', async () => {
  const {w, publisher} = writer({max_batch_bytes: 200});
  const big = 'x'.repeat(300);
  w.write(message('log', {message: big, level: 'INFO'}));
  w.write(message('log', {message: 'small', level: 'INFO'}));
  w.write(message('log', {message: 'small', level: 'INFO'}));
  w.write(message('closed'));
  await w.close();
  const sizes = publisher.batches().map((b) => b.length);
  assert.deepEqual(sizes.slice(0, 1), [1]);
  assert.equal(sizes.reduce((a, b) => a + b), 4);
});

test('heartbeats while nothing is written, none after closed', async () => {
  const {w, publisher} = writer({heartbeat_interval: 0.05});
  w.write(message('opened', {extras: {}}));
  w.start();
  await sleep(400);
  w.write(message('closed'));
  await w.close();
  const kinds = publisher.published.map((p) => p.attributes.dagster_pipes_kind);
  const heartbeats = publisher.published.filter((p) => p.attributes.dagster_pipes_kind === 'heartbeat');
  assert.ok(heartbeats.length >= 3, `heartbeats: ${kinds}`);
  assert.equal(kinds.at(-1), 'batch');
  for (const h of heartbeats) {
    assert.equal(h.data.length, 0);
    assert.equal(h.attributes.dagster_pipes_seq, undefined);
  }
});

test('a batch above the inline threshold is claim-checked under the session folder', async () => {
  const {w, publisher, store} = writer({inline_threshold: 100});
  w.write(message('log', {message: 'y'.repeat(500), level: 'INFO'}));
  w.write(message('closed'));
  await w.close();
  const [first] = publisher.published;
  const key = `dagster-pipes/${SESSION}/replies/${INVOCATION}/0.json`;
  assert.equal(first.attributes.dagster_pipes_body, 'claim');
  assert.equal(first.data.toString(), `gs://pipes-payloads/${key}`);
  assert.equal(JSON.parse(store.objects.get(key)!.toString()).length, 2);
});

test('signed replies: over the body before the claim-check, heartbeats too', async () => {
  const {w, publisher, store} = writer({inline_threshold: 100, heartbeat_interval: 0.05}, 'secret');
  w.start();
  await sleep(120);
  w.write(message('log', {message: 'z'.repeat(500), level: 'INFO'}));
  w.write(message('closed'));
  await w.close();
  for (const p of publisher.published) {
    const body = p.attributes.dagster_pipes_body === 'claim' ? store.objects.get(p.data.toString().slice('gs://pipes-payloads/'.length))! : p.data;
    assert.equal(p.attributes.dagster_pipes_signature, signature('secret', body, p.attributes));
  }
  assert.ok(publisher.published.some((p) => p.attributes.dagster_pipes_kind === 'heartbeat'));
});

test('a publish that fails is raised at close, and refuses later writes', async () => {
  const {w, publisher} = writer();
  publisher.failWith = Object.assign(new Error('permission denied'), {code: 7});
  w.start();
  w.write(message('opened', {extras: {}}));
  await sleep(20);
  assert.throws(() => w.write(message('log', {message: 'x', level: 'INFO'})), /failed earlier/);
  await assert.rejects(w.close(), /could not publish Pipes messages to projects\/p\/topics\/replies: Error: permission denied/);
});

test('a message JSON cannot carry is refused where it is written, naming the method and the place', () => {
  const {w} = writer();
  assert.throws(
    () => w.write(message('report_custom_message', {payload: {m: new Map()}})),
    /a Pipes 'report_custom_message' message cannot be sent: value\.params\.payload\.m is a Map/,
  );
});

test("a batch's body is the Python writer's, byte for byte", async () => {
  const {w, publisher} = writer({max_batch_messages: python.replies.batch_messages.length});
  for (const m of python.replies.batch_messages) w.write(m);
  w.write(message('closed'));
  await w.close();
  assert.equal(publisher.published[0].data.toString('utf-8'), python.replies.batch_body);
});
