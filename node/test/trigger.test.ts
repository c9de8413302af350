/** Triggers the Python orchestrator encodes, and the ones the Python function side refuses. */
import assert from 'node:assert/strict';
import {test} from 'node:test';

import {parsePublishTime, pubsubMessageFromPushBody} from '../src/entrypoint';
import {ProtocolError} from '../src/protocol';
import {refusal} from '../src/session';
import {decodeTrigger, decodeParam} from '../src/trigger';
import {python} from './fixtures';

for (const c of python.triggers) {
  test(`trigger "${c.name}": ${c.ok ? 'read as the Python side reads it' : 'refused, as by the Python side'}`, () => {
    const data = Buffer.from(c.data_base64, 'base64');
    if (!c.ok) {
      assert.throws(() => decodeTrigger(data, c.attributes), ProtocolError);
      return;
    }
    const read = decodeTrigger(data, c.attributes);
    assert.deepEqual(read.payload, c.payload);
    assert.deepEqual(read.settings, c.settings);
    assert.deepEqual(read.contextParams, c.context_params);
  });
}

test('a trigger for the GCS reply channel is refused by name', () => {
  const good = python.triggers.find((c: {name: string}) => c.name === 'good');
  const body = JSON.parse(Buffer.from(good.data_base64, 'base64').toString('utf-8'));
  const {deflateSync} = require('node:zlib');
  const settings = {...good.settings, channel: 'gcs', key_prefix: 'p/chunks'};
  body.DAGSTER_PIPES_MESSAGES = deflateSync(Buffer.from(JSON.stringify(settings))).toString('base64');
  assert.throws(() => decodeTrigger(Buffer.from(JSON.stringify(body)), good.attributes), /reply_channel="gcs".*not supported by the Node\.js function side/);
});

test('a bootstrap param that inflates past the cap is refused without inflating it all', () => {
  const {deflateSync} = require('node:zlib');
  const bomb = deflateSync(Buffer.alloc(65 * 1024 * 1024, 32)).toString('base64');
  assert.throws(() => decodeParam(bomb, 'DAGSTER_PIPES_CONTEXT'), /inflates to more than 67108864 bytes/);
});

test('publishTime: parsed as the Python side parses it (to the microsecond)', () => {
  for (const {value, epoch} of python.publish_times) {
    const parsed = parsePublishTime(value);
    if (epoch === null) assert.equal(parsed, null, value);
    else assert.ok(parsed !== null && Math.abs(parsed - epoch) < 1e-6, `${value}: ${parsed} != ${epoch}`);
  }
});

test('a push body without a usable message is an error naming the problem', () => {
  assert.throws(() => pubsubMessageFromPushBody({}), /carries no Pub\/Sub message/);
  assert.throws(() => pubsubMessageFromPushBody({message: {data: 3}}), /data must be a base64 string/);
  assert.throws(() => pubsubMessageFromPushBody({message: {data: 'a!!='}}), /not base64/);
  assert.throws(() => pubsubMessageFromPushBody({message: {attributes: {a: 1}}}), /attributes must be an object of strings/);
  const message = pubsubMessageFromPushBody({message: {data: 'aGk=', attributes: {a: 'b'}, messageId: 7, publishTime: '2026-01-01T00:00:00Z'}});
  assert.deepEqual(message, {data: Buffer.from('hi'), attributes: {a: 'b'}, messageId: '7', publishTime: 1767225600});
});

test('refusals: the start window from publishTime, the trigger\'s own deadline, a missing secret', () => {
  const good = python.triggers.find((c: {name: string}) => c.name === 'good');
  const read = decodeTrigger(Buffer.from(good.data_base64, 'base64'), good.attributes);
  const issued = read.settings.issued_at!; // start_window 120 s, signed
  assert.equal(refusal(read, 'secret', issued, issued + 119), null);
  assert.match(refusal(read, 'secret', issued, issued + 121)!, /delivered 1\.0s after its start window/);
  // re-published: a fresh publishTime, but past issued_at + start_window + the clock skew allowance
  assert.match(refusal(read, 'secret', issued + 800, issued + 721)!, /past the trigger's own deadline/);
  assert.equal(refusal(read, 'secret', null, issued + 700), null); // no publishTime: the window is not checked
  assert.match(refusal(read, undefined, issued, issued)!, /DAGSTER_PIPES_SIGNING_SECRET is not set/);
});
