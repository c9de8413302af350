/**
 * Wire protocol v1, as shared/protocol.py defines it: attribute names, reply attributes, the reply channel
 * params the trigger carries (`DAGSTER_PIPES_MESSAGES`), each checked as the Python side checks it.
 */

export const PROTOCOL_VERSION = '1';

/** Pub/Sub's hard limit for one message (data + attributes), in bytes. */
export const PUBSUB_MAX_MESSAGE_BYTES = 10_000_000;
/** Default claim-check threshold: well under the 4 MiB a default gRPC channel receives. */
export const DEFAULT_INLINE_THRESHOLD = 1_000_000;
/** gRPC's default receive limit. */
export const DEFAULT_GRPC_RECEIVE_BYTES = 4 * 1024 * 1024;
/** The largest inline body: under every receive path's limit with 64 KiB of head-room. */
export const MAX_INLINE_THRESHOLD = Math.min(PUBSUB_MAX_MESSAGE_BYTES, DEFAULT_GRPC_RECEIVE_BYTES) - 64 * 1024;
/** The largest claim-check object either side writes or reads. */
export const MAX_CLAIM_BYTES = 64 * 1024 * 1024;
/** How far the orchestrator's clock may be from the function's (see `issued_at`). */
export const CLOCK_SKEW_ALLOWANCE_SECONDS = 600.0;

/** The key of `opened`'s extras that echoes the trigger's `owner_token`. */
export const OWNER_TOKEN_EXTRA = 'owner_token';
/** The key of `closed`'s params that is true when the function ended its own lease before sending it (the
 * orchestrator then need not write the session's tombstone). */
export const LEASE_ENDED_PARAM = 'lease_ended';

export const BOOTSTRAP_KEYS = ['DAGSTER_PIPES_CONTEXT', 'DAGSTER_PIPES_MESSAGES'] as const;

export const REPLY_CHANNEL_PUBSUB = 'pubsub';
export const REPLY_CHANNEL_GCS = 'gcs';
const REPLY_CHANNELS = [REPLY_CHANNEL_PUBSUB, REPLY_CHANNEL_GCS];

/** Attribute names on every message of the protocol. */
export const Attr = {
  SESSION: 'dagster_pipes_session',
  VERSION: 'dagster_pipes_version',
  INVOCATION: 'dagster_pipes_invocation',
  SEQ: 'dagster_pipes_seq',
  KIND: 'dagster_pipes_kind',
  /** `inline`, or `claim` (the data is a `gs://` pointer) */
  BODY: 'dagster_pipes_body',
  /** optional HMAC-SHA256 of a reply */
  SIGNATURE: 'dagster_pipes_signature',
} as const;

export const ReplyKind = {BATCH: 'batch', HEARTBEAT: 'heartbeat'} as const;

export type Attributes = Record<string, string>;

/** A message that does not follow the protocol; the text says what is wrong with it. */
export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

const SESSION_ID_RE = /^[0-9a-f]{32}$/;

export function requireSessionId(attributes: Attributes): string {
  const sessionId = attributes[Attr.SESSION];
  if (sessionId === undefined) {
    throw new ProtocolError(`missing attribute '${Attr.SESSION}': not a Dagster Pipes message`);
  }
  if (!SESSION_ID_RE.test(sessionId)) {
    throw new ProtocolError(`attribute '${Attr.SESSION}' is not a 32-hex-digit session id: ${JSON.stringify(sessionId)}`);
  }
  const version = attributes[Attr.VERSION];
  if (version !== PROTOCOL_VERSION) {
    throw new ProtocolError(
      `unsupported protocol version ${JSON.stringify(version ?? null)} (this side speaks '${PROTOCOL_VERSION}'); ` +
        'deploy the same release of the integration on both sides',
    );
  }
  return sessionId;
}

/** The attributes of one reply: a batch (`seq` set) or a heartbeat (`seq` null), in the Python side's order. */
export function replyAttributes(sessionId: string, invocationId: string, seq: number | null): Attributes {
  const attributes: Attributes = {
    [Attr.SESSION]: sessionId,
    [Attr.VERSION]: PROTOCOL_VERSION,
    [Attr.INVOCATION]: invocationId,
    [Attr.KIND]: seq === null ? ReplyKind.HEARTBEAT : ReplyKind.BATCH,
  };
  if (seq !== null) attributes[Attr.SEQ] = String(seq);
  return attributes;
}

/** A batch's body: the messages, each encoded as it was written, as one JSON list. */
export function batchBody(encodedMessages: readonly string[]): Buffer {
  return Buffer.from(`[${encodedMessages.join(',')}]`, 'utf-8');
}

// ------------------------------------------------------------------------------------------ channel params

/** The reader's `DAGSTER_PIPES_MESSAGES` params, under their wire names (shared/protocol.py ReplyChannelParams). */
export interface ReplyChannelParams {
  topic: string;
  session_id: string;
  bucket: string;
  prefix: string;
  channel: string;
  key_prefix: string;
  chunk_interval: number;
  inline_threshold: number;
  flush_interval: number;
  heartbeat_interval: number;
  max_batch_messages: number;
  max_batch_bytes: number;
  publish_timeout: number;
  lease_seconds: number;
  function_timeout: number | null;
  start_window: number | null;
  signed: boolean;
  issued_at: number | null;
  /** a random token of the session, echoed in `opened` (`extras[OWNER_TOKEN_EXTRA]`): the orchestrator then
   * accepts the invocation as the session's owner without reading the lease; "" from an earlier release */
  owner_token: string;
}

type Kind = 'string' | 'int' | 'number' | 'boolean';
interface FieldSpec {
  kind: Kind;
  default?: unknown;
  optional?: boolean;
  positive?: boolean;
}

const FIELDS: Record<keyof ReplyChannelParams, FieldSpec> = {
  topic: {kind: 'string', default: ''},
  session_id: {kind: 'string'},
  bucket: {kind: 'string'},
  prefix: {kind: 'string'},
  channel: {kind: 'string', default: REPLY_CHANNEL_PUBSUB},
  key_prefix: {kind: 'string', default: ''},
  chunk_interval: {kind: 'number', default: 10.0},
  inline_threshold: {kind: 'int', default: DEFAULT_INLINE_THRESHOLD},
  flush_interval: {kind: 'number', default: 0.0},
  heartbeat_interval: {kind: 'number', default: 10.0, positive: true},
  max_batch_messages: {kind: 'int', default: 1000, positive: true},
  max_batch_bytes: {kind: 'int', default: 512_000, positive: true},
  publish_timeout: {kind: 'number', default: 60.0, positive: true},
  lease_seconds: {kind: 'number', default: 600.0, positive: true},
  function_timeout: {kind: 'number', default: null, optional: true},
  start_window: {kind: 'number', default: null, optional: true},
  signed: {kind: 'boolean', default: false},
  issued_at: {kind: 'number', default: null, optional: true},
  owner_token: {kind: 'string', default: ''},
};

function fieldProblem(spec: FieldSpec, value: unknown): string | null {
  if (value === null) return spec.optional ? null : 'must not be null';
  if (spec.kind === 'string') return typeof value === 'string' ? null : 'must be a string';
  if (spec.kind === 'boolean') return typeof value === 'boolean' ? null : 'must be true or false';
  if (typeof value !== 'number' || (spec.kind === 'int' && !Number.isInteger(value))) {
    return spec.kind === 'int' ? 'must be a whole number' : 'must be a number';
  }
  if (!Number.isFinite(value) || value < 0 || (value === 0 && spec.positive)) {
    return spec.positive ? 'must be a finite number above zero' : 'must be a finite number, not negative';
  }
  return null;
}

export function validateThreshold(threshold: number): number {
  if (!(threshold >= 0 && threshold <= MAX_INLINE_THRESHOLD)) {
    throw new ProtocolError(
      `inline_threshold_bytes=${threshold} is outside 0..${MAX_INLINE_THRESHOLD}: a larger inline message cannot be ` +
        `received by a subscriber on a default gRPC channel (${DEFAULT_GRPC_RECEIVE_BYTES} bytes) and Pub/Sub rejects ` +
        `messages over ${PUBSUB_MAX_MESSAGE_BYTES} bytes; set it to at most ${MAX_INLINE_THRESHOLD} ` +
        `(default ${DEFAULT_INLINE_THRESHOLD}): bodies above it go through GCS`,
    );
  }
  return threshold;
}

/** The params as sent, each field checked for its type (`ProtocolError` naming the first that is wrong);
 * keys this release does not know are ignored (a newer orchestrator's). */
export function replyChannelParams(params: unknown): ReplyChannelParams {
  if (params === null || typeof params !== 'object' || Array.isArray(params)) {
    const got = Array.isArray(params) ? 'list' : params === null ? 'null' : typeof params;
    throw new ProtocolError(`DAGSTER_PIPES_MESSAGES must be a JSON object, got a JSON ${got}`);
  }
  const given = params as Record<string, unknown>;
  const channel = given.channel ?? REPLY_CHANNEL_PUBSUB;
  if (typeof channel !== 'string' || !REPLY_CHANNELS.includes(channel)) {
    throw new ProtocolError(
      `unknown reply channel ${JSON.stringify(channel)} (expected one of ${JSON.stringify(REPLY_CHANNELS)})`,
    );
  }
  const required = [channel === REPLY_CHANNEL_PUBSUB ? 'topic' : 'key_prefix', 'session_id', 'bucket', 'prefix'];
  const missing = required.filter((k) => !(k in given));
  if (missing.length) {
    throw new ProtocolError(
      `DAGSTER_PIPES_MESSAGES lacks ${JSON.stringify(missing)}: the trigger was not sent by PipesPubSubClient`,
    );
  }
  const out: Record<string, unknown> = {};
  for (const [key, spec] of Object.entries(FIELDS)) out[key] = spec.default;
  for (const [key, value] of Object.entries(given)) {
    const spec = FIELDS[key as keyof ReplyChannelParams];
    if (spec === undefined) continue;
    const problem = fieldProblem(spec, value);
    if (problem) {
      throw new ProtocolError(
        `DAGSTER_PIPES_MESSAGES field '${key}' = ${JSON.stringify(value).slice(0, 80)}: ${problem}`,
      );
    }
    out[key] = value;
  }
  return out as unknown as ReplyChannelParams;
}
