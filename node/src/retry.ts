/**
 * One retry policy for every Pub/Sub and GCS call (shared/retry.py): transient failures (unavailable,
 * overloaded, timed out, a reset connection) are retried with bounded, jittered exponential backoff;
 * anything else (not found, permission denied, a failed precondition, bad input) is raised at once.
 */
import {log} from './logs';

/** gRPC status codes (Pub/Sub): UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNAVAILABLE. */
const TRANSIENT_GRPC = new Set([2, 4, 8, 10, 13, 14]);
/** HTTP statuses (Cloud Storage). */
const TRANSIENT_HTTP = new Set([408, 429, 500, 502, 503, 504]);
/** Node's network errors. */
const TRANSIENT_NETWORK = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'ETIMEDOUT',
  'EPIPE',
  'EAI_AGAIN',
  'ENETUNREACH',
  'EHOSTUNREACH',
  'UND_ERR_SOCKET',
  'UND_ERR_CONNECT_TIMEOUT',
]);

/** The numeric status of a client library error: an HTTP status (>= 100) or a gRPC code (< 100). */
export function statusOf(error: unknown): number | undefined {
  const code = (error as {code?: unknown} | null)?.code;
  return typeof code === 'number' ? code : undefined;
}

export function isTransient(error: unknown): boolean {
  if (error === null || typeof error !== 'object') return false;
  const code = (error as {code?: unknown}).code;
  if (typeof code === 'number') return code < 100 ? TRANSIENT_GRPC.has(code) : TRANSIENT_HTTP.has(code);
  if (typeof code === 'string' && TRANSIENT_NETWORK.has(code)) return true;
  const cause = (error as {cause?: unknown}).cause;
  if (cause !== undefined && cause !== error && isTransient(cause)) return true;
  const name = (error as {name?: unknown}).name;
  const message = String((error as {message?: unknown}).message ?? '');
  return name === 'TimeoutError' || name === 'AbortError' || /socket hang up|fetch failed/i.test(message);
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export interface RetryOptions {
  maxSeconds?: number;
  /** null: bounded by time alone */
  maxAttempts?: number | null;
}

/** `fn()`, its transient failures retried for at most `maxSeconds` / `maxAttempts` (then the last is thrown);
 * waits are full-jitter exponential from 0.2 s, at most 5 s (tenacity's `wait_random_exponential(0.2, max=5)`). */
export async function withRetry<T>(what: string, fn: () => Promise<T>, options: RetryOptions = {}): Promise<T> {
  const maxSeconds = options.maxSeconds ?? 60;
  const maxAttempts = options.maxAttempts === undefined ? 12 : options.maxAttempts;
  const started = Date.now();
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (error) {
      const outOfTime = (Date.now() - started) / 1000 >= maxSeconds;
      if (!isTransient(error) || outOfTime || (maxAttempts !== null && attempt >= maxAttempts)) throw error;
      const wait = Math.random() * Math.min(5, 0.2 * 2 ** attempt);
      log.warning('retry', `${what} failed (attempt ${attempt}): ${String(error)}; retrying in ${wait.toFixed(2)} s`);
      await sleep(wait * 1000);
    }
  }
}

/** `promise`, or a `TimeoutError` naming `what` after `seconds`. */
export async function withTimeout<T>(what: string, promise: Promise<T>, seconds: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const error = new Error(`${what} did not complete within ${seconds} s`);
      error.name = 'TimeoutError';
      reject(error);
    }, seconds * 1000);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
