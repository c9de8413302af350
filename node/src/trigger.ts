/**
 * Read a trigger message, whole, before anything acts on it (function/trigger.py): the envelope, the Pipes
 * bootstrap params and every field the function reads from them, each checked for its type. Anyone who may
 * publish to the trigger topic decides these bytes: what cannot run is one `ProtocolError` naming the
 * problem, decided here once. Only reading a claim-checked body touches the network; its transient errors
 * propagate (a redelivery may fix them).
 */
import {inflateSync} from 'node:zlib';

import {BlobStore, unwrap} from './claimCheck';
import {
  Attributes,
  BOOTSTRAP_KEYS,
  MAX_CLAIM_BYTES,
  ProtocolError,
  REPLY_CHANNEL_GCS,
  ReplyChannelParams,
  replyChannelParams,
  requireSessionId,
  validateThreshold,
} from './protocol';
import {statusOf} from './retry';

/** The most a bootstrap param may inflate to: the largest body a claim-check carries. */
export const MAX_PARAM_BYTES = MAX_CLAIM_BYTES;

/** The Pipes context as the orchestrator's injector sends it: inline, or a GCS object. */
export type ContextParams = {data: Record<string, unknown>} | {bucket: string; key: string};

export interface ReadTrigger {
  sessionId: string;
  payload: Record<string, unknown>;
  settings: ReplyChannelParams;
  contextParams: ContextParams;
}

const utf8 = new TextDecoder('utf-8', {fatal: true});

function jsonType(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'list';
  return typeof value === 'object' ? 'dict' : typeof value === 'string' ? 'str' : typeof value;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

function parseJson(data: Buffer, what: string): unknown {
  try {
    return JSON.parse(utf8.decode(data));
  } catch (error) {
    throw new ProtocolError(`${what} is not UTF-8 JSON: ${(error as Error).message}`);
  }
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** A bootstrap param as dagster-pipes encodes it (base64 of zlib of JSON), inflated to at most
 * `MAX_PARAM_BYTES`; it must be a JSON object. */
export function decodeParam(encoded: string, key: string): Record<string, unknown> {
  if (!BASE64.test(encoded)) {
    throw new ProtocolError(`${key} is not a Pipes param (base64 of zlib-compressed JSON): not base64`);
  }
  let raw: Buffer;
  try {
    raw = inflateSync(Buffer.from(encoded, 'base64'), {maxOutputLength: MAX_PARAM_BYTES});
  } catch (error) {
    if ((error as {code?: string}).code === 'ERR_BUFFER_TOO_LARGE') {
      throw new ProtocolError(`${key} inflates to more than ${MAX_PARAM_BYTES} bytes: not read`);
    }
    throw new ProtocolError(`${key} is not a Pipes param (base64 of zlib-compressed JSON): ${(error as Error).message}`);
  }
  let value: unknown;
  try {
    value = JSON.parse(utf8.decode(raw));
  } catch (error) {
    throw new ProtocolError(`${key} is not JSON: ${(error as Error).message}`);
  }
  if (!isObject(value)) throw new ProtocolError(`${key} must decode to a JSON object, got a JSON ${jsonType(value)}`);
  return value;
}

function contextParams(params: Record<string, unknown>): ContextParams {
  if (isObject(params.data)) return {data: params.data};
  if (typeof params.bucket === 'string' && typeof params.key === 'string') return {bucket: params.bucket, key: params.key};
  throw new ProtocolError(
    `DAGSTER_PIPES_CONTEXT must be {"data": {...}} or {"bucket": "...", "key": "..."}, got keys ` +
      JSON.stringify(Object.keys(params).sort().slice(0, 10)),
  );
}

/** Decode a trigger body that is already unwrapped (pure: the same bytes always give the same answer). */
export function decodeTrigger(body: Buffer, attributes: Attributes): ReadTrigger {
  const sessionId = requireSessionId(attributes);
  const obj = parseJson(body, 'the trigger');
  if (!isObject(obj)) throw new ProtocolError(`the trigger must be a JSON object, got ${jsonType(obj)}`);
  const missing = BOOTSTRAP_KEYS.filter((k) => typeof obj[k] !== 'string');
  if (missing.length) throw new ProtocolError(`the trigger lacks the Pipes bootstrap params ${JSON.stringify(missing)}`);
  const payload: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(obj)) {
    if (!(BOOTSTRAP_KEYS as readonly string[]).includes(key)) payload[key] = value;
  }
  const context = decodeParam(obj.DAGSTER_PIPES_CONTEXT as string, 'DAGSTER_PIPES_CONTEXT');
  const messages = decodeParam(obj.DAGSTER_PIPES_MESSAGES as string, 'DAGSTER_PIPES_MESSAGES');
  const settings = replyChannelParams(messages);
  if (settings.session_id !== sessionId) {
    throw new ProtocolError(
      `DAGSTER_PIPES_MESSAGES names session '${settings.session_id}', the message's attributes '${sessionId}'`,
    );
  }
  validateThreshold(settings.inline_threshold);
  const parsedContext = contextParams(context);
  if (settings.channel === REPLY_CHANNEL_GCS) {
    throw new ProtocolError(
      `session ${sessionId}: reply_channel="gcs" (the earlier design's GCS chunks) is not supported by the Node.js ` +
        'function side: use the default reply_channel="pubsub"',
    );
  }
  return {sessionId, payload, settings, contextParams: parsedContext};
}

/** The trigger in `data` (fetched from GCS when claim-checked); `ProtocolError` for anything a redelivery
 * of the same bytes cannot change. */
export async function readTrigger(store: BlobStore, data: Buffer, attributes: Attributes): Promise<ReadTrigger> {
  let body: Buffer;
  try {
    body = await unwrap(store, data, attributes);
  } catch (error) {
    const status = statusOf(error);
    if (status === 404 || status === 400) {
      throw new ProtocolError(`the trigger's claim-checked body cannot be read: ${(error as Error).message}`);
    }
    throw error;
  }
  try {
    return decodeTrigger(body, attributes);
  } catch (error) {
    if (error instanceof ProtocolError) throw error;
    throw new ProtocolError(`the trigger does not decode (${(error as Error).name}: ${(error as Error).message})`);
  }
}
