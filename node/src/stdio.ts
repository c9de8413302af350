/**
 * What a handler prints reaches its Dagster step (function/stdio.py): `console.log`, `console.error` and
 * anything else written to `process.stdout`/`process.stderr` is forwarded as Pipes `log_external_stream`
 * messages, which Dagster writes to the step's own stdout and stderr. Every write still goes to the
 * stream (the function's log, Cloud Logging, has it).
 *
 * `captureOutput` wraps the streams' `write` once per process (again if someone replaced it since). A
 * session's text is buffered per stream and sent as complete lines, many lines a message, every
 * `interval` seconds (or as soon as `maxChars` piled up); what is left is sent when the block ends.
 *
 * Which session wrote a line: the one whose `captureOutput` the writing code runs in (an
 * `AsyncLocalStorage`, so every `await`, timer and promise the handler starts is attributed, even when one
 * instance serves several requests at once). A write from outside any session's code goes to the only
 * session running, if exactly one is, else only to the function's log. The library's own log lines are
 * never forwarded.
 *
 * Not captured: writes to the file descriptors themselves (child processes, `fs.writeSync(1, ...)`).
 */
import {AsyncLocalStorage} from 'node:async_hooks';

import {isPassing, log, uncaptured} from './logs';

export type Stream = 'stdout' | 'stderr';
const STREAMS: readonly Stream[] = ['stdout', 'stderr'];

/** Where forwarded text goes: the session's Pipes context. */
export interface StreamSink {
  logExternalStream(stream: Stream, text: string): void;
}

const current = new AsyncLocalStorage<SessionOutput>();
let active: SessionOutput[] = [];
const CAPTURING = Symbol('dagster-gcf-pipes capturing write');

function owner(): SessionOutput | undefined {
  if (isPassing()) return undefined;
  return current.getStore() ?? (active.length === 1 ? active[0] : undefined);
}

function textOf(chunk: unknown, encoding: unknown): string {
  if (typeof chunk === 'string') return chunk;
  if (chunk instanceof Uint8Array) {
    return Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength).toString(
      typeof encoding === 'string' && Buffer.isEncoding(encoding) ? encoding : 'utf-8',
    );
  }
  return '';
}

/** Wrap each stream's `write` (once; again if it was replaced since). */
function install(): void {
  for (const name of STREAMS) {
    const stream = process[name];
    if ((stream.write as unknown as Record<symbol, boolean>)[CAPTURING]) continue;
    const original = stream.write;
    const write = function (this: NodeJS.WriteStream, chunk: unknown, ...rest: unknown[]): boolean {
      const written = (original as (...args: unknown[]) => boolean).call(this, chunk, ...rest);
      const session = owner();
      if (session !== undefined) session.add(name, textOf(chunk, rest[0]));
      return written;
    };
    (write as unknown as Record<symbol, boolean>)[CAPTURING] = true;
    stream.write = write as typeof stream.write;
  }
}

/** `text` in pieces of at most about `size` characters, cut after a newline where there is one. */
export function* chunks(text: string, size: number): Generator<string> {
  let start = 0;
  while (start < text.length) {
    let end = start + size;
    if (end < text.length) {
      const newline = text.lastIndexOf('\n', end - 1);
      end = newline >= start ? newline + 1 : end;
    }
    yield text.slice(start, end);
    start = end;
  }
}

/** One session's printed text, buffered per stream and forwarded on a timer. */
export class SessionOutput {
  private readonly pending: Record<Stream, string[]> = {stdout: [], stderr: []};
  private pendingChars = 0;
  private timer: NodeJS.Timeout | undefined;
  private failed = false;
  private closed = false;
  private flushQueued = false;

  constructor(
    private readonly sink: StreamSink,
    private readonly interval: number,
    private readonly maxChars: number,
  ) {}

  add(stream: Stream, text: string): void {
    if (!text || this.closed) return; // a late continuation of a session that ended: its own log only
    this.pending[stream].push(text);
    this.pendingChars += text.length;
    if (this.pendingChars >= this.maxChars && !this.flushQueued) {
      this.flushQueued = true;
      setImmediate(() => {
        this.flushQueued = false;
        this.forward(false);
      });
    }
  }

  start(): void {
    this.timer = setInterval(() => this.forward(false), this.interval * 1000);
  }

  /** Send what is left (a last line without its newline too) and stop forwarding. */
  close(): void {
    clearInterval(this.timer);
    this.forward(true);
    this.closed = true;
  }

  private forward(everything: boolean): void {
    for (const stream of STREAMS) this.send(stream, this.take(stream, everything));
  }

  /** The complete lines pending on `stream`; the unfinished rest stays, unless `everything` or it is half of
   * `maxChars` long already. */
  private take(stream: Stream, everything: boolean): string {
    const text = this.pending[stream].join('');
    let cut = everything ? text.length : Math.max(text.lastIndexOf('\n'), text.lastIndexOf('\r')) + 1;
    if (text.length - cut >= Math.floor(this.maxChars / 2)) cut = text.length;
    const rest = text.slice(cut);
    this.pending[stream] = rest ? [rest] : [];
    this.pendingChars -= cut;
    return text.slice(0, cut);
  }

  private send(stream: Stream, text: string): void {
    if (this.failed || !text) return;
    try {
      for (const chunk of chunks(text, this.maxChars)) this.sink.logExternalStream(stream, chunk);
    } catch (error) {
      this.failed = true;
      log.warning('stdio', `forwarding ${stream} to Dagster stopped: ${String(error)} (it still goes to the function's log)`);
    }
  }
}

/** Run `fn` with what it writes to stdout/stderr (and every async continuation it starts) forwarded to
 * `sink`, as well as to the streams. The last of the text is sent when `fn` settles. */
export async function captureOutput<T>(
  sink: StreamSink,
  fn: () => Promise<T>,
  interval = 0.1,
  maxChars = 64_000,
): Promise<T> {
  install();
  const output = new SessionOutput(sink, interval, maxChars);
  output.start();
  active = [...active, output];
  try {
    return await current.run(output, fn);
  } finally {
    active = active.filter((o) => o !== output);
    uncaptured(() => output.close());
  }
}
