/**
 * The reply writer (function/message_writer.py): Pipes messages, encoded as they are written, leave as
 * numbered batches (one Pub/Sub message each), one publish at a time: a batch leaves when it reaches
 * `max_batch_messages` or `max_batch_bytes`, or `flush_interval` after its first message (0 by default: as
 * soon as the previous publish is acknowledged). While nothing is written a heartbeat goes out every
 * `heartbeat_interval`. `closed` is the last batch (a message written after it is dropped), and closing
 * waits until every batch is acknowledged.
 *
 * Node runs the flusher on the event loop: a handler that keeps the loop busy (synchronous work, no
 * `await`) holds back batches and heartbeats until it yields.
 */
import {performance} from 'node:perf_hooks';

import {BlobStore, ClaimCheck} from './claimCheck';
import {Publisher} from './clients';
import {replyKey} from './layout';
import {log} from './logs';
import {Attributes, OWNER_TOKEN_EXTRA, ReplyChannelParams, batchBody, replyAttributes} from './protocol';
import {COMPACT, dumps} from './pyjson';
import {sign} from './signing';

export interface PipesMessage {
  __dagster_pipes_version: string;
  method: string;
  params: Record<string, unknown> | null;
}

/** What the writer reports in `opened`: the invocation that owns the session, the request's trace, and the
 * trigger's owner token (the orchestrator then accepts the invocation without reading the lease). */
export function openedExtras(invocationId: string, traceId: string | undefined, ownerToken = ''): Record<string, string> {
  return {
    invocation_id: invocationId,
    ...(traceId ? {trace_id: traceId} : {}),
    ...(ownerToken ? {[OWNER_TOKEN_EXTRA]: ownerToken} : {}),
  };
}

const seconds = (): number => performance.now() / 1000;

export interface ReplyWriterOptions {
  publisher: Publisher;
  blobStore: BlobStore;
  settings: ReplyChannelParams;
  invocationId: string;
  signingSecret?: string;
}

export class ReplyWriter {
  private readonly publisher: Publisher;
  private readonly settings: ReplyChannelParams;
  private readonly claimCheck: ClaimCheck;
  private readonly invocationId: string;
  private readonly signingSecret?: string;
  private buffer: string[] = [];
  private bufferBytes = 0;
  private firstBufferedAt: number | null = null;
  private lastSentAt = seconds();
  private closing = false;
  private seq = 0;
  private error: unknown = null;
  private wake: (() => void) | null = null;
  private flusher: Promise<void> | null = null;
  batchesSent = 0;

  constructor(options: ReplyWriterOptions) {
    this.publisher = options.publisher;
    this.settings = options.settings;
    this.claimCheck = new ClaimCheck(options.blobStore, options.settings.inline_threshold);
    this.invocationId = options.invocationId;
    this.signingSecret = options.signingSecret;
  }

  start(): void {
    this.flusher ??= this.flushLoop();
  }

  /** Buffer one message (encoded now, as Python's `json.dumps(message, separators=(",", ":"))`). */
  write(message: PipesMessage): void {
    let encoded: string;
    try {
      encoded = dumps(message, {separators: COMPACT});
    } catch (error) {
      throw new TypeError(`a Pipes '${message.method}' message cannot be sent: ${(error as Error).message}`);
    }
    if (this.error !== null) {
      throw new Error('the Pipes reply channel failed earlier; see the first error', {cause: this.error});
    }
    if (this.closing) {
      log.debug('message_writer', `dropping a Pipes '${message.method}' message written after 'closed'`);
      return;
    }
    this.buffer.push(encoded);
    this.bufferBytes += Buffer.byteLength(encoded) + 1;
    const wasEmpty = this.firstBufferedAt === null;
    if (wasEmpty) this.firstBufferedAt = seconds();
    if (message.method === 'closed') this.closing = true;
    if (wasEmpty || this.closing || this.batchFull()) this.notify();
  }

  /** Send what is buffered, stop, and throw the error that stopped publishing, if one did. */
  async close(): Promise<void> {
    this.closing = true;
    this.notify();
    this.start();
    await this.flusher;
    if (this.error !== null) {
      throw new Error(`could not publish Pipes messages to ${this.settings.topic}: ${String(this.error)}`, {
        cause: this.error,
      });
    }
  }

  private batchFull(): boolean {
    const s = this.settings;
    return this.buffer.length >= s.max_batch_messages || this.bufferBytes >= s.max_batch_bytes;
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  private sleep(secondsToWait: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.wake = null;
        resolve();
      }, Math.max(secondsToWait * 1000, 1));
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  private async flushLoop(): Promise<void> {
    const s = this.settings;
    try {
      for (;;) {
        const now = seconds();
        if (
          this.buffer.length &&
          (this.closing || this.batchFull() || now - this.firstBufferedAt! >= s.flush_interval)
        ) {
          await this.publishBatch(this.takeBatch());
          continue;
        }
        if (this.closing && !this.buffer.length) return;
        if (!this.buffer.length && now - this.lastSentAt >= s.heartbeat_interval) {
          await this.publishHeartbeat();
          continue;
        }
        const deadline = this.buffer.length
          ? this.firstBufferedAt! + s.flush_interval
          : this.lastSentAt + s.heartbeat_interval;
        await this.sleep(deadline - now);
      }
    } catch (error) {
      log.error('message_writer', `publishing Pipes replies to ${s.topic} failed: ${String(error)}`);
      this.error = error;
    }
  }

  /** Cut at most one batch's worth off the buffer; the rest stays for the next round. */
  private takeBatch(): string[] {
    const s = this.settings;
    let count = 0;
    let size = 0;
    for (const item of this.buffer) {
      const bytes = Buffer.byteLength(item) + 1;
      if (count && (count >= s.max_batch_messages || size + bytes > s.max_batch_bytes)) break;
      count += 1;
      size += bytes;
    }
    const batch = this.buffer.slice(0, count);
    this.buffer = this.buffer.slice(count);
    this.bufferBytes -= size;
    this.firstBufferedAt = this.buffer.length ? seconds() : null;
    return batch;
  }

  private async publishBatch(encodedMessages: string[]): Promise<void> {
    const s = this.settings;
    const body = batchBody(encodedMessages);
    const attributes = this.signed(body, replyAttributes(s.session_id, this.invocationId, this.seq));
    const wrapped = await this.claimCheck.wrap(body, replyKey(s.prefix, s.session_id, this.invocationId, this.seq));
    await this.send(wrapped.data, {...attributes, ...wrapped.attributes});
    this.seq += 1;
  }

  private async publishHeartbeat(): Promise<void> {
    const body = Buffer.alloc(0);
    await this.send(body, this.signed(body, replyAttributes(this.settings.session_id, this.invocationId, null)));
  }

  private signed(body: Buffer, attributes: Attributes): Attributes {
    return this.signingSecret ? sign(this.signingSecret, body, attributes) : attributes;
  }

  private async send(data: Buffer, attributes: Attributes): Promise<void> {
    await this.publisher.publish(this.settings.topic, data, attributes, this.settings.publish_timeout);
    this.batchesSent += 1;
    this.lastSentAt = seconds();
  }
}
