/**
 * Watching a running session (function/cancellation.py): cooperative cancellation and the function's own
 * deadline. The function learns it must stop from the session lease, which the orchestrator ends when the
 * run is terminated, when it stops waiting, and whenever the session is over: the watcher reads it before
 * the handler starts, then every `interval` seconds (at most `POLL_SECONDS`). A Cloud Function is not
 * stopped at its timeout, so the session stops itself a little before: `onDeadline` cancels the handler
 * and closes the session with a timeout error.
 */
import {performance} from 'node:perf_hooks';

import {log} from './logs';
import {isTransient} from './retry';

/** The longest a running session goes without looking at its lease. */
export const POLL_SECONDS = 1.0;

/** How long before the platform's timeout the session closes itself: time to publish `closed`. */
export function deadlineMargin(functionTimeout: number): number {
  return Math.min(10.0, 0.1 * functionTimeout);
}

/** `performance.now()` in seconds: the clock deadlines are on. */
export const monotonic = (): number => performance.now() / 1000;

/** Set once, with the reason, when the session must stop; its `signal` aborts then. */
export class Cancellation {
  private readonly controller = new AbortController();
  reason = '';

  set(reason: string): void {
    if (!this.isSet) {
      this.reason = reason;
      this.controller.abort(reason);
    }
  }

  get isSet(): boolean {
    return this.controller.signal.aborted;
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }
}

async function check(whyStop: () => Promise<string | null>, cancellation: Cancellation): Promise<void> {
  let reason: string | null;
  try {
    reason = await whyStop();
  } catch (error) {
    // a missed check is retried at the next interval; a permanent error is reported and retried too
    const what = isTransient(error) ? 'could not' : 'failed to';
    log.warning('cancellation', `${what} read the session lease to check for cancellation: ${String(error)}`);
    return;
  }
  if (reason) {
    log.warning('cancellation', `cancelling the session: ${reason}`);
    cancellation.set(reason);
  }
}

export interface WatchOptions {
  interval: number;
  /** `monotonic()` seconds, or null for no deadline */
  deadline: number | null;
  /** awaited: stopping the watch waits for it */
  onDeadline: () => void | Promise<void>;
}

/** Check `whyStop()` now, then every `interval` seconds until the returned stop function is called or the
 * session is cancelled; call `onDeadline()` once at `deadline` if the watch lasts that long (no check after
 * it; the stop function waits for it to finish). */
export async function watchSession(
  whyStop: () => Promise<string | null>,
  cancellation: Cancellation,
  options: WatchOptions,
): Promise<() => Promise<void>> {
  await check(whyStop, cancellation);
  const interval = Math.min(options.interval, POLL_SECONDS);
  const {deadline} = options;
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<void> = Promise.resolve();

  const schedule = (): void => {
    const wait = deadline === null ? interval : Math.min(interval, Math.max(deadline - monotonic(), 0));
    timer = setTimeout(() => {
      running = tick();
    }, wait * 1000);
  };
  const tick = async (): Promise<void> => {
    if (stopped) return;
    if (deadline !== null && monotonic() >= deadline) {
      try {
        await options.onDeadline();
      } catch (error) {
        log.warning('cancellation', `closing the session at the function's deadline failed: ${String(error)}`);
      }
      return;
    }
    if (!cancellation.isSet) await check(whyStop, cancellation);
    if (!stopped) schedule();
  };
  schedule();
  return async () => {
    stopped = true;
    clearTimeout(timer);
    await running;
  };
}
