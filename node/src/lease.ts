/**
 * The session lease `PREFIX/leases/SESSION` (shared/lease.py, function/lease.py).
 *
 * The first execution of a trigger creates it **held** with `ifGenerationMatch=0` (GCS creates it only if
 * it does not exist, atomically) and runs the session; every other execution (a redelivery, a retry while
 * it runs, a duplicate after the end) finds it and does not run. A held lease that expired (its invocation
 * crashed) may be taken over, conditionally on the stale generation. An **ended** lease, the session's
 * tombstone, is never taken over; the running function polls it to learn it was cancelled. The invocation
 * that holds the lease ends it itself as it closes the session, over the generation it claimed
 * (`endOwnLease`); else the orchestrator ends it.
 *
 * The record is the object's custom metadata; the body repeats it as JSON, and the orchestrator reads the
 * body's `invocation_id` to accept an `opened`: both are written exactly as the Python side writes them.
 */
import type {File, Storage} from '@google-cloud/storage';

import {CLAIM, parseGsUrl} from './claimCheck';
import {leaseKey, triggerKey} from './layout';
import {log} from './logs';
import {Attr, Attributes, CLOCK_SKEW_ALLOWANCE_SECONDS, ProtocolError, requireSessionId} from './protocol';
import {PyFloat, dumps, pyFloatRepr} from './pyjson';
import {statusOf, withRetry} from './retry';

export const HELD = 'held';
export const ENDED = 'ended';
const FIELD = 'dagster_pipes_lease_';

export interface LeaseRecord {
  state: string;
  /** the invocation that holds (or last held) the session */
  invocation_id: string;
  /** when a held lease may be taken over (the function's clock, epoch seconds) */
  expires_at: number;
  /** ended: why the session ended */
  reason: string;
  /** ended: how long after the tombstone was written a delivery could still fall in the start window */
  keep_seconds: number;
}

export function leaseRecord(fields: Partial<LeaseRecord> & {state: string}): LeaseRecord {
  return {invocation_id: '', expires_at: 0, reason: '', keep_seconds: 0, ...fields};
}

/** How long past the start window a tombstone is kept (shared/lease.py `TOMBSTONE_MARGIN_SECONDS`): the
 * trigger's own deadline with its skew allowance, for an orchestrator clock off either way, and a minute for
 * a function's clock against Pub/Sub's publishTime and a delivery in flight when the window closes. */
export const TOMBSTONE_MARGIN_SECONDS = 2 * CLOCK_SKEW_ALLOWANCE_SECONDS + 60.0;

/** The reason of the tombstone a function writes as it closes its session. */
export const CLOSED_BY_THE_FUNCTION = 'the function closed the session';

/** The ended record of a session whose trigger had `startWindow` seconds to start it. */
export function tombstone(reason: string, startWindow: number, invocationId = ''): LeaseRecord {
  return leaseRecord({state: ENDED, invocation_id: invocationId, reason, keep_seconds: startWindow + TOMBSTONE_MARGIN_SECONDS});
}

/** The object's custom metadata: each field as Python's `str()` writes it. */
export function leaseMetadata(record: LeaseRecord): Record<string, string> {
  return {
    [`${FIELD}state`]: record.state,
    [`${FIELD}invocation_id`]: record.invocation_id,
    [`${FIELD}expires_at`]: pyFloatRepr(record.expires_at),
    [`${FIELD}reason`]: record.reason,
    [`${FIELD}keep_seconds`]: pyFloatRepr(record.keep_seconds),
  };
}

/** The object's body: `json.dumps(asdict(record))`. */
export function leaseBody(record: LeaseRecord): string {
  return dumps({
    state: record.state,
    invocation_id: record.invocation_id,
    expires_at: new PyFloat(record.expires_at),
    reason: record.reason,
    keep_seconds: new PyFloat(record.keep_seconds),
  });
}

/** A lease object whose record does not parse; the text says which field. */
export class MalformedLease extends Error {
  override name = 'MalformedLease';
}

function seconds(values: Record<string, string>, key: string): number {
  const raw = values[key];
  const number = raw ? Number(raw) : 0;
  if (!Number.isFinite(number) || number < 0) {
    throw new MalformedLease(`${key} ${JSON.stringify(raw.slice(0, 40))} is not a finite, non-negative number of seconds`);
  }
  return number;
}

/** The record in an object's metadata; null for an object that is not a lease; `MalformedLease` for one that does not parse. */
export function leaseFromMetadata(metadata: Record<string, unknown> | undefined | null): LeaseRecord | null {
  const values: Record<string, string> = {};
  for (const [key, value] of Object.entries(metadata ?? {})) {
    if (key.startsWith(FIELD) && typeof value === 'string') values[key.slice(FIELD.length)] = value;
  }
  if (!('state' in values)) return null;
  if (values.state !== HELD && values.state !== ENDED) {
    throw new MalformedLease(`state ${JSON.stringify(values.state.slice(0, 40))} is neither '${HELD}' nor '${ENDED}'`);
  }
  return {
    state: values.state,
    invocation_id: values.invocation_id ?? '',
    expires_at: seconds(values, 'expires_at'),
    reason: values.reason ?? '',
    keep_seconds: seconds(values, 'keep_seconds'),
  };
}

/** An object's record; one without a readable record counts as ended (nothing may claim what it cannot read). */
export function readLease(metadata: Record<string, unknown> | undefined | null): LeaseRecord {
  try {
    return leaseFromMetadata(metadata) ?? leaseRecord({state: ENDED, reason: 'unreadable lease object'});
  } catch (error) {
    if (error instanceof MalformedLease) {
      return leaseRecord({state: ENDED, reason: `unreadable lease object: ${error.message}`});
    }
    throw error;
  }
}

/** Create (`generation` 0) or replace (the generation read) the lease; a full upload, never a metadata patch
 * (a patch keeps the generation, so a concurrent conditional claim would overwrite an ended lease). Throws
 * the client's 412 error if someone else wrote it first. */
export async function writeLease(file: File, record: LeaseRecord, generation: number): Promise<void> {
  await file.save(leaseBody(record), {
    resumable: false,
    contentType: 'application/json',
    metadata: {metadata: leaseMetadata(record)},
    preconditionOpts: {ifGenerationMatch: generation},
  });
}

interface Held {
  record: LeaseRecord;
  generation: number;
}

/** The lease object's record and generation; null if there is none. One metadata GET. */
async function fetchLease(storage: Storage, bucket: string, key: string): Promise<Held | null> {
  try {
    const [metadata] = await storage.bucket(bucket).file(key).getMetadata();
    return {record: readLease(metadata.metadata as Record<string, unknown>), generation: Number(metadata.generation)};
  } catch (error) {
    if (statusOf(error) === 404) return null;
    throw error;
  }
}

export type Claim = 'claimed' | 'held' | 'ended';

export interface TakenLease {
  claim: Claim;
  /** the generation of the lease this invocation now holds (0 if it holds none), over which it ends the lease
   * as it closes the session (`endOwnLease`) */
  generation: number;
}

/** Try to take the session's lease for `invocationId`; transient errors retried. */
export function takeLease(
  storage: Storage,
  bucket: string,
  key: string,
  invocationId: string,
  leaseSeconds: number,
): Promise<TakenLease> {
  const none = (claim: Claim): TakenLease => ({claim, generation: 0});
  return withRetry(`claiming the lease gs://${bucket}/${key}`, async () => {
    const now = Date.now() / 1000;
    const record = leaseRecord({state: HELD, invocation_id: invocationId, expires_at: now + leaseSeconds});
    const file = storage.bucket(bucket).file(key);
    try {
      await writeLease(file, record, 0);
      return {claim: 'claimed', generation: generationOf(file)};
    } catch (error) {
      if (statusOf(error) !== 412) throw error;
    }
    const held = await fetchLease(storage, bucket, key);
    if (held === null) return none('ended'); // removed between our two calls: only a sweep removes leases
    const lease = held.record;
    if (lease.state !== HELD) {
      log.info('lease', `lease gs://${bucket}/${key}: the session already ended (${lease.reason}): this delivery is late and does not run`);
      return none('ended');
    }
    if (lease.invocation_id === invocationId) return {claim: 'claimed', generation: held.generation}; // a retried upload whose first attempt landed
    if (lease.expires_at > now) {
      log.info('lease', `lease gs://${bucket}/${key} is held by invocation ${lease.invocation_id}: this delivery is a duplicate and does not run`);
      return none('held');
    }
    try {
      await writeLease(file, record, held.generation);
    } catch (error) {
      if (statusOf(error) === 412) return none('held'); // another retry took the stale lease first (or it was ended)
      throw error;
    }
    log.warning('lease', `lease gs://${bucket}/${key} of invocation ${lease.invocation_id} expired; invocation ${invocationId} takes the session over`);
    return {claim: 'claimed', generation: generationOf(file)};
  });
}

/** The generation of the object `file` was last written as (the upload's answer), 0 if unknown. */
function generationOf(file: File): number {
  return Number(file.metadata.generation ?? 0) || 0;
}

/** End the session in the lease this invocation holds (`generation`, as it claimed it), as it closes the
 * session: the tombstone a late delivery finds, written here so that the orchestrator need not write it.
 * Transient errors are retried for at most 10 s. False when the lease changed since the claim (412: the
 * orchestrator ended the session, or a retry took it over; it is not ours to end) or the write failed
 * otherwise (logged); the orchestrator then ends it as before. */
export async function endOwnLease(
  storage: Storage,
  bucket: string,
  key: string,
  invocationId: string,
  generation: number,
  startWindow: number,
): Promise<boolean> {
  const record = tombstone(CLOSED_BY_THE_FUNCTION, startWindow, invocationId);
  const file = storage.bucket(bucket).file(key);
  try {
    await withRetry(`ending the lease gs://${bucket}/${key}`, () => writeLease(file, record, generation), {maxSeconds: 10});
    return true;
  } catch (error) {
    if (statusOf(error) !== 412) {
      log.warning('lease', `could not end the lease gs://${bucket}/${key} (${String(error)}): the orchestrator ends it`);
    }
    return false;
  }
}

/** Why the session `invocationId` runs must stop, or null while the lease is still its own. One metadata GET. */
export async function whyStop(storage: Storage, bucket: string, key: string, invocationId: string): Promise<string | null> {
  const held = await fetchLease(storage, bucket, key);
  if (held === null) return 'its lease is gone: the session was ended';
  if (held.record.state !== HELD) return `the orchestrator ended the session (${held.record.reason})`;
  if (held.record.invocation_id !== invocationId) return `invocation ${held.record.invocation_id} took the session over`;
  return null;
}

/** `[session id, reason]` when `data` is a claim-checked trigger's pointer and its session has ended: a late
 * delivery whose body went with the session. The lease lies beside the body
 * (`gs://B/PREFIX/SESSION/trigger.json` → `gs://B/PREFIX/leases/SESSION`); null for anything else. */
export async function endedSessionOfClaim(
  storage: Storage,
  data: Buffer,
  attributes: Attributes,
): Promise<[string, string] | null> {
  if (attributes[Attr.BODY] !== CLAIM) return null;
  let sessionId: string, bucket: string, key: string;
  try {
    sessionId = requireSessionId(attributes);
    [bucket, key] = parseGsUrl(new TextDecoder('utf-8', {fatal: true}).decode(data));
  } catch (error) {
    if (error instanceof ProtocolError || error instanceof TypeError) return null;
    throw error;
  }
  const suffix = triggerKey('', sessionId);
  const prefix = (key.endsWith(suffix) ? key.slice(0, -suffix.length) : key).replace(/\/+$/, '');
  if (triggerKey(prefix, sessionId) !== key) return null;
  const held = await fetchLease(storage, bucket, leaseKey(prefix, sessionId));
  return held !== null && held.record.state !== HELD ? [sessionId, held.record.reason] : null;
}
