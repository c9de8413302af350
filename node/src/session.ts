/**
 * One Pipes session on the function side (function/session.py): decode the trigger, refuse it if it must
 * not start, claim the lease, open Pipes, watch the lease and the deadline, run the handler, close (the
 * lease ended by this invocation, then `closed`).
 *
 * `runSession` never throws for a handler error: that reaches Dagster through `closed` (with its stack) and
 * is returned, so the platform does not redeliver a trigger whose failure Dagster already knows about. A
 * trigger that cannot run (malformed in any field, late, a duplicate, its bucket missing) is logged in one
 * line and returned too. It throws only what a redelivery may fix (Cloud Storage unreachable past its
 * retry budget, permission denied, anything unforeseen while taking the lease): the function then answers
 * an error and Eventarc redelivers, within the trigger's start window.
 */
import {randomUUID} from 'node:crypto';

import type {Storage} from '@google-cloud/storage';

import {Cancellation, deadlineMargin, monotonic, watchSession} from './cancellation';
import {BlobStore} from './claimCheck';
import * as clients from './clients';
import {PipesContext, PipesContextData, SessionCancelled, pipesException} from './context';
import {leaseKey} from './layout';
import {endOwnLease, endedSessionOfClaim, takeLease, whyStop} from './lease';
import {currentTrace, log} from './logs';
import {ReplyWriter, openedExtras} from './messageWriter';
import {Attributes, CLOCK_SKEW_ALLOWANCE_SECONDS, MAX_CLAIM_BYTES, ProtocolError, ReplyChannelParams} from './protocol';
import {statusOf} from './retry';
import {SECRET_ENV_VAR} from './signing';
import {captureOutput} from './stdio';
import {ContextParams, ReadTrigger, readTrigger} from './trigger';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Payload = Record<string, any>;
export type Handler = (pipes: PipesContext, payload: Payload) => unknown;

export interface SessionOutcome {
  sessionId: string | null;
  invocationId: string;
  ran: boolean;
  error?: unknown;
}

/** The clients a session uses; the process-wide ones unless a test passes its own. */
export interface Services {
  storage: Storage;
  publisher: clients.Publisher;
  blobStore(bucket: string): BlobStore;
}

export function defaultServices(): Services {
  return {storage: clients.storage(), publisher: clients.publisher(), blobStore: clients.blobStore};
}

export interface RunOptions {
  messageId?: string;
  /** the request's trace id: the session's log lines carry it, and Dagster records it from `opened` */
  traceId?: string;
  /** the trigger message's `publishTime` (epoch seconds, Pub/Sub's clock): the start window counts from it */
  publishTime?: number | null;
  services?: Services;
}

/** Why this delivery must not start the session, if it must not: past the start window (from the
 * message's `publishTime`, Pub/Sub's clock), past the trigger's own deadline (`issued_at`, against a
 * re-published trigger), or replies must be signed and the secret is missing. */
export function refusal(read: ReadTrigger, signingSecret: string | undefined, publishTime: number | null, now: number): string | null {
  const {settings, sessionId} = read;
  if (settings.start_window !== null && publishTime !== null) {
    const lateBy = now - (publishTime + settings.start_window);
    if (lateBy > 0) {
      return (
        `session ${sessionId}: delivered ${lateBy.toFixed(1)}s after its start window (start_window=` +
        `${settings.start_window}s from the trigger's publishTime; the orchestrator stopped waiting for it to start): ` +
        'a late duplicate or a backlog; not running it'
      );
    }
  }
  if (settings.start_window !== null && settings.issued_at !== null) {
    const lateBy = now - (settings.issued_at + settings.start_window + CLOCK_SKEW_ALLOWANCE_SECONDS);
    if (lateBy > 0) {
      return (
        `session ${sessionId}: ${lateBy.toFixed(1)}s past the trigger's own deadline (issued_at + start_window=` +
        `${settings.start_window}s + ${CLOCK_SKEW_ALLOWANCE_SECONDS}s allowed for clock skew): a re-published or ` +
        'replayed trigger of a session that is over; not running it'
      );
    }
  }
  if (settings.signed && !signingSecret) {
    return (
      `session ${sessionId}: the orchestrator requires signed replies but ${SECRET_ENV_VAR} is not set on the ` +
      "function: set it to the orchestrator's signing_secret"
    );
  }
  return null;
}

async function loadContext(params: ContextParams, services: Services): Promise<PipesContextData> {
  if ('data' in params) return params.data as unknown as PipesContextData;
  const body = await services.blobStore(params.bucket).get(`gs://${params.bucket}/${params.key}`, MAX_CLAIM_BYTES);
  return JSON.parse(body.toString('utf-8')) as PipesContextData;
}

async function endedSession(services: Services, data: Buffer, attributes: Attributes): Promise<[string, string] | null> {
  try {
    return await endedSessionOfClaim(services.storage, data, attributes);
  } catch (error) {
    log.warning('session', `could not read the session lease of an undecodable trigger: ${String(error)}`);
    return null;
  }
}

/** How the session's context ends the lease as it closes the session, if it may: with a start window to keep
 * the tombstone for, and a lease this invocation claimed (on the Pub/Sub channel, the only one served here). */
function leaseEnder(
  services: Services,
  settings: ReplyChannelParams,
  key: string,
  invocationId: string,
  generation: number,
): (() => Promise<boolean>) | undefined {
  const startWindow = settings.start_window;
  if (startWindow === null || !generation) return undefined;
  return () => endOwnLease(services.storage, settings.bucket, key, invocationId, generation, startWindow);
}

/** Run `handler` for one trigger message (see the module comment for what it returns and throws). */
export async function runSession(
  handler: Handler,
  data: Buffer,
  attributes: Attributes,
  options: RunOptions = {},
): Promise<SessionOutcome> {
  const project = clients.projectFromEnvironment();
  const trace = options.traceId && project ? `projects/${project}/traces/${options.traceId}` : undefined;
  return currentTrace.run(trace, () => run(handler, data, attributes, options));
}

async function run(handler: Handler, data: Buffer, attributes: Attributes, options: RunOptions): Promise<SessionOutcome> {
  const arrived = monotonic();
  const invocationId = randomUUID().replace(/-/g, '');
  const messageId = options.messageId || '?';
  const services = options.services ?? defaultServices();
  let read: ReadTrigger;
  try {
    // only reads: a claim-check pointer names its own bucket
    read = await readTrigger(services.blobStore(''), data, attributes);
  } catch (error) {
    if (!(error instanceof ProtocolError)) throw error;
    const ended = await endedSession(services, data, attributes);
    if (ended !== null) {
      log.info('session', `dropping trigger message ${messageId}: session ${ended[0]} already ended (${ended[1]}): this delivery is late and does not run`);
      return {sessionId: ended[0], invocationId, ran: false};
    }
    log.error('session', `dropping trigger message ${messageId}: ${error.message}`);
    return {sessionId: null, invocationId, ran: false, error};
  }
  const {sessionId, settings} = read;

  const signingSecret = process.env[SECRET_ENV_VAR] || undefined;
  const refused = refusal(read, signingSecret, options.publishTime ?? null, Date.now() / 1000);
  if (refused) {
    log.error('session', `dropping trigger message ${messageId}: ${refused}`);
    return {sessionId, invocationId, ran: false, error: new ProtocolError(refused)};
  }

  const key = leaseKey(settings.prefix, sessionId);
  let taken;
  try {
    taken = await takeLease(services.storage, settings.bucket, key, invocationId, settings.lease_seconds);
  } catch (error) {
    const status = statusOf(error);
    if (status !== 404 && status !== 400) throw error; // what a redelivery may fix
    const problem = new ProtocolError(
      `session ${sessionId}: its lease gs://${settings.bucket}/${key} cannot be written (${status} ` +
        `${(error as Error).message}): the orchestrator's bucket='${settings.bucket}' must be a bucket this function ` +
        'can reach (the same project, or the same emulator); not running it',
    );
    log.error('session', `dropping trigger message ${messageId}: ${problem.message}`);
    return {sessionId, invocationId, ran: false, error: problem};
  }
  if (taken.claim !== 'claimed') return {sessionId, invocationId, ran: false};

  log.info('session', `session ${sessionId}: invocation ${invocationId} starts (trigger message ${messageId})`);
  const writer = new ReplyWriter({
    publisher: services.publisher,
    blobStore: services.blobStore(settings.bucket),
    settings,
    invocationId,
    signingSecret,
  });
  const cancellation = new Cancellation();
  let pipes: PipesContext;
  try {
    const contextData = await loadContext(read.contextParams, services);
    const endLease = leaseEnder(services, settings, key, invocationId, taken.generation);
    pipes = new PipesContext(contextData, writer, cancellation, endLease);
  } catch (error) {
    log.error('session', `session ${sessionId}: the Pipes context could not be loaded: ${String(error)}`);
    return {sessionId, invocationId, ran: true, error};
  }
  pipes.open(openedExtras(invocationId, options.traceId, settings.owner_token));
  writer.start();

  const deadline =
    settings.function_timeout === null
      ? null
      : arrived + settings.function_timeout - deadlineMargin(settings.function_timeout);
  const onDeadline = (): Promise<void> => {
    const message =
      `session ${sessionId}: the handler was still running at the function's timeout (function_timeout=` +
      `${settings.function_timeout}s, less ${deadlineMargin(settings.function_timeout ?? 0)}s to report it); the ` +
      "session was closed and the handler asked to stop. Raise the function's timeout (gcloud functions deploy " +
      '--timeout, then function_timeout), or split the work (run_many)';
    log.error('session', message);
    cancellation.set(`the function's timeout (function_timeout=${settings.function_timeout}s) is reached`);
    return pipes.close({message: `SessionTimeout: ${message}\n`, stack: [], name: 'SessionTimeout', cause: null, context: null});
  };

  let handlerStarted = false;
  let failure: unknown = undefined;
  const stopWatching = await watchSession(
    () => whyStop(services.storage, settings.bucket, key, invocationId),
    cancellation,
    {interval: settings.heartbeat_interval, deadline, onDeadline},
  );
  try {
    pipes.raiseIfCancelled(); // ended while the session was being set up: the handler never starts
    handlerStarted = true;
    await captureOutput(pipes, async () => handler(pipes, {...read.payload}));
  } catch (error) {
    failure = error;
  } finally {
    await stopWatching(); // before the lease is ended: the watch would read the tombstone as a cancellation
  }
  await pipes.close(failure === undefined ? null : pipesException(failure));
  try {
    await writer.close();
  } catch (error) {
    log.error('session', `session ${sessionId}: ${String(error)}`);
    return {sessionId, invocationId, ran: true, error};
  }

  if (failure === undefined) return {sessionId, invocationId, ran: true};
  if (failure instanceof SessionCancelled) {
    if (!handlerStarted) {
      log.warning('session', `session ${sessionId}: the handler was not started: ${failure.message}`);
      return {sessionId, invocationId, ran: false, error: failure};
    }
    log.info('session', `session ${sessionId}: the handler stopped: ${failure.message}; reported to Dagster`);
  } else {
    const stack = failure instanceof Error ? failure.stack : String(failure);
    log.error('session', `session ${sessionId}: the handler raised; reported to Dagster\n${stack}`);
  }
  return {sessionId, invocationId, ran: true, error: failure};
}
