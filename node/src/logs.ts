/**
 * The function's own log lines (function/logs.py): one JSON object per line on stdout, which Cloud Logging
 * parses into `severity` and `message`. While a session runs its lines carry the request's trace
 * (`logging.googleapis.com/trace`). They never reach Dagster: they are written past the stdio capture.
 */
import {AsyncLocalStorage} from 'node:async_hooks';

export const LOGGER_NAME = 'dagster_gcf_pipes.node';

/** The trace resource name (projects/P/traces/T) of the request being served, if it carried one. */
export const currentTrace = new AsyncLocalStorage<string | undefined>();

let passing = false;

/** Whether a write now comes from this library (its log lines, a forwarder): the capture skips it. */
export function isPassing(): boolean {
  return passing;
}

/** Run `fn` with the stdio capture off: what it writes is nobody's print. */
export function uncaptured<T>(fn: () => T): T {
  const before = passing;
  passing = true;
  try {
    return fn();
  } finally {
    passing = before;
  }
}

type Severity = 'DEBUG' | 'INFO' | 'WARNING' | 'ERROR';

function emit(severity: Severity, module: string, message: string): void {
  const entry: Record<string, string> = {severity, message, logger: `${LOGGER_NAME}.${module}`};
  const trace = currentTrace.getStore();
  if (trace) entry['logging.googleapis.com/trace'] = trace;
  uncaptured(() => process.stdout.write(JSON.stringify(entry) + '\n'));
}

export const log = {
  debug: (module: string, message: string) => {
    if (process.env.DAGSTER_GCF_PIPES_DEBUG) emit('DEBUG', module, message);
  },
  info: (module: string, message: string) => emit('INFO', module, message),
  warning: (module: string, message: string) => emit('WARNING', module, message),
  error: (module: string, message: string) => emit('ERROR', module, message),
};

const TRACEPARENT = /^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$/;
const CLOUD_TRACE_CONTEXT = /^([0-9a-fA-F]{32})(\/.*)?$/;

/** The trace id of a request (W3C `traceparent`, or `X-Cloud-Trace-Context`), or of a CloudEvent (its
 * `traceparent` extension: pass the event). */
export function traceIdFrom(headers: Record<string, unknown>): string | undefined {
  for (const [name, pattern] of [
    ['traceparent', TRACEPARENT],
    ['x-cloud-trace-context', CLOUD_TRACE_CONTEXT],
  ] as const) {
    const key = Object.keys(headers).find((k) => k.toLowerCase() === name);
    const value = key === undefined ? undefined : headers[key];
    const match = typeof value === 'string' ? pattern.exec(value.trim()) : null;
    if (match) return match[1].toLowerCase();
  }
  return undefined;
}
