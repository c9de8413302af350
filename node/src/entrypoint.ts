/**
 * `pipesFunction`: turns `async (pipes, payload) => {...}` into a CloudEvent function (function/entrypoint.py).
 *
 * Eventarc (and, locally, the Functions Framework fed by a push subscription) hands it a CloudEvent of type
 * `google.cloud.pubsub.topic.v1.messagePublished` whose data is `{"message": {"data": <base64>,
 * "attributes": {...}, "messageId": ..., "publishTime": ...}}`. Its promise resolves (a 2xx: the delivery
 * is acknowledged) once the session ran or can never run, and rejects (a 5xx: redelivered) only for what
 * a redelivery may fix.
 */
import type {CloudEvent} from '@google-cloud/functions-framework';

import {log, traceIdFrom} from './logs';
import {Attributes} from './protocol';
import {Handler, RunOptions, SessionOutcome, runSession} from './session';

/** The Pub/Sub message of a push body; `publishTime` in epoch seconds (Pub/Sub's clock), null without one. */
export interface PushedMessage {
  data: Buffer;
  attributes: Attributes;
  messageId: string;
  publishTime: number | null;
}

const RFC3339 = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$/i;

/** RFC 3339 `publishTime` (`2026-11-25T14:44:26.123456789Z`) as epoch seconds, to the microsecond; null if
 * absent or not a timestamp (the start window is then not checked, rather than a good trigger refused). */
export function parsePublishTime(value: unknown): number | null {
  if (typeof value !== 'string' || !value) return null;
  const match = RFC3339.exec(value);
  const whole = match ? Date.parse(`${match[1]}${match[3].toUpperCase()}`) : NaN;
  if (!match || Number.isNaN(whole)) {
    log.warning('entrypoint', `ignoring a publishTime that is not an RFC 3339 timestamp: ${JSON.stringify(value)}`);
    return null;
  }
  const micros = Number((match[2] ?? '').slice(0, 6).padEnd(6, '0'));
  return Math.round(whole / 1000) + micros / 1e6;
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** The Pub/Sub message in a push body `{"message": {...}}`; an `Error` naming what is wrong otherwise. */
export function pubsubMessageFromPushBody(body: unknown): PushedMessage {
  const message = body !== null && typeof body === 'object' ? (body as {message?: unknown}).message : undefined;
  if (message === null || typeof message !== 'object' || Array.isArray(message)) {
    throw new Error(
      'the request carries no Pub/Sub message: deploy the function with --trigger-topic ' +
        '(event type google.cloud.pubsub.topic.v1.messagePublished)',
    );
  }
  const {data, attributes, messageId, publishTime} = message as Record<string, unknown>;
  const encoded = data || '';
  if (typeof encoded !== 'string') {
    throw new Error(`the Pub/Sub message's data must be a base64 string, got a JSON ${typeof encoded}`);
  }
  const attrs = attributes || {};
  if (typeof attrs !== 'object' || Array.isArray(attrs) || !Object.values(attrs).every((v) => typeof v === 'string')) {
    throw new Error("the Pub/Sub message's attributes must be an object of strings");
  }
  if (!BASE64.test(encoded)) throw new Error("the Pub/Sub message's data is not base64");
  return {
    data: Buffer.from(encoded, 'base64'),
    attributes: attrs as Attributes,
    messageId: messageId === undefined || messageId === null ? '' : String(messageId),
    publishTime: parsePublishTime(publishTime),
  };
}

/** Set on the functions `pipesFunction` returns: tooling tells a pipes function from a plain one by it. */
export const MARKER = Symbol.for('dagster-gcf-pipes.pipes-function');

export interface PipesCloudEventFunction {
  (cloudEvent: CloudEvent<unknown>): Promise<SessionOutcome>;
  /** the handler as written */
  readonly pipesHandler: Handler;
  readonly [MARKER]: 'cloudevent';
}

export function isPipesFunction(value: unknown): value is PipesCloudEventFunction {
  return typeof value === 'function' && (value as unknown as Record<symbol, unknown>)[MARKER] === 'cloudevent';
}

/** Make `handler(pipes, payload)` a CloudEvent function: export it under your entry point's name
 * (`--target`/`--entry-point` with `--signature-type=cloudevent` locally) or register it with the
 * Functions Framework's `cloudEvent("main", main)`. */
export function pipesFunction(handler: Handler, options: Pick<RunOptions, 'services'> = {}): PipesCloudEventFunction {
  const entryPoint = async (cloudEvent: CloudEvent<unknown>): Promise<SessionOutcome> => {
    let message: PushedMessage;
    try {
      message = pubsubMessageFromPushBody(cloudEvent?.data);
    } catch (error) {
      log.error('entrypoint', `ignoring event ${cloudEvent?.id ?? '?'}: ${(error as Error).message}`);
      return {sessionId: null, invocationId: '', ran: false, error};
    }
    return runSession(handler, message.data, message.attributes, {
      messageId: message.messageId,
      traceId: traceIdFrom((cloudEvent ?? {}) as unknown as Record<string, unknown>),
      publishTime: message.publishTime,
      services: options.services,
    });
  };
  Object.defineProperty(entryPoint, 'name', {value: handler.name || 'pipesFunction'});
  return Object.assign(entryPoint, {pipesHandler: handler, [MARKER]: 'cloudevent' as const});
}
