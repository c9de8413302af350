/** The reply envelope, signing, claim-check, layout and lease, byte for byte against the Python side. */
import assert from 'node:assert/strict';
import {test} from 'node:test';

import {BlobStore, ClaimCheck, unwrap} from '../src/claimCheck';
import * as layout from '../src/layout';
import type {Storage} from '@google-cloud/storage';

import {ENDED, endOwnLease, leaseBody, leaseFromMetadata, leaseMetadata, readLease} from '../src/lease';
import {batchBody, replyAttributes} from '../src/protocol';
import {COMPACT, dumps} from '../src/pyjson';
import {canonical, sign} from '../src/signing';
import {python} from './fixtures';

const replies = python.replies;

/** The batch body as the writer builds it: each message encoded as written, joined into a list. */
const body = (): Buffer => batchBody(replies.batch_messages.map((m: unknown) => dumps(m, {separators: COMPACT})));

test('a batch: its body and attributes', () => {
  assert.equal(body().toString('utf-8'), replies.batch_body);
  assert.deepEqual(replyAttributes(replies.session, replies.invocation, 3), replies.batch_attributes);
});

test('a heartbeat: an empty body, no seq', () => {
  assert.equal(replies.heartbeat_body, '');
  assert.deepEqual(replyAttributes(replies.session, replies.invocation, null), replies.heartbeat_attributes);
});

test('signatures match the Python side (batch, heartbeat, transport attributes left out)', () => {
  assert.equal(canonical(body(), replies.batch_attributes).toString('utf-8'), replies.batch_canonical);
  assert.deepEqual(sign(replies.secret, body(), replies.batch_attributes), replies.batch_signed);
  assert.deepEqual(sign(replies.secret, Buffer.alloc(0), replies.heartbeat_attributes), replies.heartbeat_signed);
  const {attributes, signed} = replies.unsigned_attributes_ignored;
  assert.deepEqual(sign(replies.secret, body(), attributes), signed);
});

class MemoryStore implements BlobStore {
  objects = new Map<string, Buffer>();
  constructor(readonly bucket: string) {}
  async put(key: string, data: Buffer): Promise<string> {
    this.objects.set(key, data);
    return `gs://${this.bucket}/${key}`;
  }
  async get(url: string): Promise<Buffer> {
    return this.objects.get(url.slice(`gs://${this.bucket}/`.length))!;
  }
}

test('claim-check: above the threshold the data is a gs:// pointer to the body', async () => {
  const fixture = python.claim_check;
  const store = new MemoryStore('pipes-payloads');
  const claimed = await new ClaimCheck(store, fixture.claimed.threshold).wrap(Buffer.from(fixture.body), fixture.key);
  assert.equal(claimed.data.toString('utf-8'), fixture.claimed.data);
  assert.deepEqual(claimed.attributes, fixture.claimed.attributes);
  assert.deepEqual(
    Object.fromEntries([...store.objects].map(([k, v]) => [k, v.toString('utf-8')])),
    fixture.claimed.stored,
  );
  assert.equal((await unwrap(store, claimed.data, claimed.attributes)).toString('utf-8'), fixture.body);

  const inline = await new ClaimCheck(store, fixture.inline.threshold).wrap(Buffer.from(fixture.body), fixture.key);
  assert.equal(inline.data.toString('utf-8'), fixture.inline.data);
  assert.deepEqual(inline.attributes, fixture.inline.attributes);
});

test('claim-check: a threshold above what a subscriber receives is refused', () => {
  assert.throws(() => new ClaimCheck(new MemoryStore('b'), 5_000_000), /outside 0\.\.4128768/);
});

test('layout: every key as the Python side names it', () => {
  for (const f of python.layout) {
    const s = python.replies.session;
    assert.equal(layout.sessionPrefix(f.prefix, s), f.session_prefix);
    assert.equal(layout.triggerKey(f.prefix, s), f.trigger_key);
    assert.equal(layout.contextKey(f.prefix, s), f.context_key);
    assert.equal(layout.leaseKey(f.prefix, s), f.lease_key);
    assert.equal(layout.replyKey(f.prefix, s, python.replies.invocation, 12), f.reply_key);
  }
});

test('lease: metadata and body byte for byte, and read back', () => {
  for (const {record, metadata, body: expected} of python.leases) {
    assert.deepEqual(leaseMetadata(record), metadata);
    assert.equal(leaseBody(record), expected);
    assert.deepEqual(leaseFromMetadata(metadata), record);
  }
});

test('lease: a record that does not parse counts as ended', () => {
  const held = python.leases[0].metadata;
  assert.equal(leaseFromMetadata({other: 'x'}), null);
  assert.equal(readLease({}).state, ENDED);
  const bad = readLease({...held, dagster_pipes_lease_state: 'mine'});
  assert.equal(bad.state, ENDED);
  assert.match(bad.reason, /state "mine" is neither/);
  assert.match(readLease({...held, dagster_pipes_lease_expires_at: 'soon'}).reason, /expires_at "soon" is not a finite/);
  assert.match(readLease({...held, dagster_pipes_lease_expires_at: '-1'}).reason, /not a finite, non-negative/);
});

/** A Cloud Storage client that records each upload and answers it with the next of `failures` (then success). */
function recordingStorage(failures: {code: number}[] = []): {storage: Storage; uploads: Record<string, unknown>[]} {
  const uploads: Record<string, unknown>[] = [];
  const file = (bucket: string, key: string) => ({
    save: async (data: string, options: {contentType: string; metadata: {metadata: unknown}; preconditionOpts: {ifGenerationMatch: number}}) => {
      uploads.push({bucket, key, body: data, metadata: options.metadata.metadata, content_type: options.contentType,
                    generation: options.preconditionOpts.ifGenerationMatch});
      const failure = failures.shift();
      if (failure) throw Object.assign(new Error(`status ${failure.code}`), failure);
    },
  });
  const storage = {bucket: (bucket: string) => ({file: (key: string) => file(bucket, key)})} as unknown as Storage;
  return {storage, uploads};
}

test('the own lease ended as the Python side ends it: the same upload, over the generation claimed', async () => {
  const f = python.own_tombstone;
  const {storage, uploads} = recordingStorage();
  assert.equal(await endOwnLease(storage, f.bucket, f.key, f.invocation, f.generation, f.start_window), f.ended);
  const {ended, invocation, start_window, ...upload} = f;
  assert.deepEqual(uploads, [upload]);
});

test('the own lease: a transient error retried; a 412 (not ours any more) or another error is false', async () => {
  const f = python.own_tombstone;
  const end = (storage: Storage) => endOwnLease(storage, f.bucket, f.key, f.invocation, f.generation, f.start_window);
  const flaky = recordingStorage([{code: 503}]);
  assert.equal(await end(flaky.storage), true);
  assert.equal(flaky.uploads.length, 2);
  const taken = recordingStorage([{code: 412}]);
  assert.equal(await end(taken.storage), false);
  assert.equal(taken.uploads.length, 1);
  assert.equal(await end(recordingStorage([{code: 403}]).storage), false);
});
