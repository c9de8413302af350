/**
 * The Pipes context handed to a handler: what dagster-pipes' `PipesContext` offers (the step's asset keys,
 * partitions, extras; logs, materializations, checks, custom messages), one per invocation, plus the
 * session's cooperative cancellation. Every message it writes has the shape and key order dagster-pipes
 * gives it, so the orchestrator cannot tell which language wrote it. Names follow Dagster's TypeScript
 * Pipes (`reportAssetMaterialization`, `assetKey`...), with an options object where Python has keywords.
 */
import {format} from 'node:util';

import {Cancellation} from './cancellation';
import {PipesMessage} from './messageWriter';
import {LEASE_ENDED_PARAM} from './protocol';
import {PyFloat} from './pyjson';

export const PIPES_PROTOCOL_VERSION = '0.1';

export class DagsterPipesError extends Error {
  override name = 'DagsterPipesError';
}

/** Raised by `raiseIfCancelled()` once the session must stop (the run was terminated, or the orchestrator
 * ended the session, or the function's timeout is near). */
export class SessionCancelled extends Error {
  override name = 'SessionCancelled';
}

/** The session reached the function's timeout and was closed by the function itself. */
export class SessionTimeout extends Error {
  override name = 'SessionTimeout';
}

export interface PipesException {
  message: string;
  stack: string[];
  name: string | null;
  cause: PipesException | null;
  context: PipesException | null;
}

export interface PartitionKeyRange {
  start: string;
  end: string;
}
export type PartitionTimeWindow = PartitionKeyRange;

export interface DataProvenance {
  code_version: string;
  input_data_versions: Record<string, string>;
  is_user_provided: boolean;
}

/** The context the orchestrator sends (dagster-pipes' `PipesContextData`). */
export interface PipesContextData {
  asset_keys: string[] | null;
  code_version_by_asset_key: Record<string, string | null> | null;
  provenance_by_asset_key: Record<string, DataProvenance | null> | null;
  partition_key: string | null;
  partition_key_range: PartitionKeyRange | null;
  partition_time_window: PartitionTimeWindow | null;
  run_id: string;
  job_name: string | null;
  retry_number: number;
  extras: Record<string, unknown>;
}

export const METADATA_TYPES = [
  '__infer__',
  'text',
  'url',
  'path',
  'notebook',
  'json',
  'md',
  'float',
  'int',
  'bool',
  'dagster_run',
  'asset',
  'null',
  'table',
  'table_schema',
  'table_column_lineage',
  'timestamp',
] as const;
export type MetadataType = (typeof METADATA_TYPES)[number];
export interface MetadataValue {
  raw_value: unknown;
  type: MetadataType;
}
/** A raw value (its type inferred by Dagster) or `{raw_value, type}`. */
export type Metadata = Record<string, unknown>;

export type AssetCheckSeverity = 'WARN' | 'ERROR';

export interface MaterializationOptions {
  metadata?: Metadata | null;
  dataVersion?: string | null;
  /** required when the step has several assets */
  assetKey?: string | null;
}

export interface AssetCheckOptions {
  checkName: string;
  passed: boolean;
  severity?: AssetCheckSeverity;
  metadata?: Metadata | null;
  assetKey?: string | null;
}

/** Where the context's messages go: the session's reply writer. */
export interface MessageSink {
  write(message: PipesMessage): void;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** dagster-pipes' `_normalize_param_metadata`: raw values become `{raw_value, type: "__infer__"}`; an
 * object must be exactly `{raw_value, type}` with a known type. */
export function normalizeMetadata(metadata: unknown, method: string): Record<string, MetadataValue> {
  if (!isPlainObject(metadata)) {
    throw new DagsterPipesError(`Invalid type for parameter \`metadata\` of \`${method}\`. Expected an object.`);
  }
  const out: Record<string, MetadataValue> = {};
  for (const [key, value] of Object.entries(metadata)) {
    if (value === undefined) continue; // as JSON.stringify leaves it out
    if (isPlainObject(value)) {
      const keys = Object.keys(value).sort();
      if (keys.length !== 2 || keys[0] !== 'raw_value' || keys[1] !== 'type') {
        throw new DagsterPipesError(
          `Invalid type for parameter \`metadata\` of \`${method}\`. Expected an object with string keys and values ` +
            'that are either raw metadata values or objects with schema `{raw_value: ..., type: ...}`. Got a value ' +
            `\`${JSON.stringify(value)}\` for \`${key}\`: wrap an object value as {raw_value: ..., type: "json"}.`,
        );
      }
      if (!(METADATA_TYPES as readonly unknown[]).includes(value.type)) {
        throw new DagsterPipesError(
          `Invalid value for parameter \`metadata.${key}.type\` of \`${method}\`. Expected one of ` +
            `\`${JSON.stringify(METADATA_TYPES)}\`, got \`${String(value.type)}\`.`,
        );
      }
      // Dagster's `float` metadata refuses a Python int, and an integral JavaScript number is written as one
      const raw = value.type === 'float' && typeof value.raw_value === 'number' ? new PyFloat(value.raw_value) : value.raw_value;
      out[key] = {raw_value: raw, type: value.type as MetadataType};
    } else {
      out[key] = {raw_value: value, type: '__infer__'};
    }
  }
  return out;
}

/** The `closed` message's exception for what a handler threw: `name: message`, V8's stack frames (one line
 * each, outermost first as Python's are), and the `cause` chain (`new Error(..., {cause})`). */
export function pipesException(error: unknown, seen: Set<unknown> = new Set()): PipesException {
  seen.add(error);
  if (!(error instanceof Error)) {
    return {message: `${String(error)}\n`, stack: [], name: null, cause: null, context: null};
  }
  const frames = (error.stack ?? '')
    .split('\n')
    .filter((line) => /^\s+at /.test(line))
    .map((line) => `  ${line.trim()}\n`)
    .reverse();
  const cause = error.cause !== undefined && !seen.has(error.cause) ? pipesException(error.cause, seen) : null;
  return {message: `${error.name}: ${error.message}\n`, stack: frames, name: error.name, cause, context: null};
}

/** `pipes.log`: lines at a level, as dagster-pipes' logger sends them (`util.format` for extra arguments). */
export class PipesLogger {
  constructor(private readonly write: (message: string, level: string) => void) {}

  debug(message: unknown, ...args: unknown[]): void {
    this.write(format(message, ...args), 'DEBUG');
  }
  info(message: unknown, ...args: unknown[]): void {
    this.write(format(message, ...args), 'INFO');
  }
  warning(message: unknown, ...args: unknown[]): void {
    this.write(format(message, ...args), 'WARNING');
  }
  /** `warning`, under the name JavaScript's console uses */
  warn(message: unknown, ...args: unknown[]): void {
    this.warning(message, ...args);
  }
  error(message: unknown, ...args: unknown[]): void {
    this.write(format(message, ...args), 'ERROR');
  }
  critical(message: unknown, ...args: unknown[]): void {
    this.write(format(message, ...args), 'CRITICAL');
  }
}

function defined<T>(value: T | null | undefined, key: string): T {
  if (value === null || value === undefined) {
    throw new DagsterPipesError(`Missing required property: \`${key}\` is undefined. ${missingReason(key)}`);
  }
  return value;
}

function missingReason(key: string): string {
  return key.startsWith('partition')
    ? 'Current step does not target any partitions.'
    : 'Current step does not target an asset.';
}

export class PipesContext {
  private readonly data: PipesContextData;
  private readonly sink: MessageSink;
  private readonly cancellation: Cancellation;
  private readonly endLease?: () => Promise<boolean>;
  private readonly materialized = new Set<string>();
  private closed = false;
  private closing: Promise<void> | null = null;
  /** Lines sent to the Dagster step's log. */
  readonly log: PipesLogger;

  /** `endLease`: ends the session's lease as the session closes, true if it did (see `close`). */
  constructor(data: PipesContextData, sink: MessageSink, cancellation: Cancellation, endLease?: () => Promise<boolean>) {
    this.data = data;
    this.sink = sink;
    this.cancellation = cancellation;
    this.endLease = endLease;
    this.log = new PipesLogger((message, level) => this.writeMessage('log', {message, level}));
  }

  // ------------------------------------------------------------------------------------------ session

  /** True once the session must stop: the run was terminated, the orchestrator ended the session, or the
   * function's timeout is near. */
  get isCancelled(): boolean {
    return this.cancellation.isSet;
  }

  /** Aborts when the session is cancelled: pass it to `fetch`, timers and clients that take one. */
  get signal(): AbortSignal {
    return this.cancellation.signal;
  }

  /** Stop here (with `SessionCancelled`, reported through `closed`) if the session was cancelled. */
  raiseIfCancelled(): void {
    if (this.isCancelled) throw new SessionCancelled(`the session was cancelled: ${this.cancellation.reason}`);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Write `opened` (the session's first message). */
  open(extras: Record<string, unknown>): void {
    this.writeMessage('opened', {extras});
  }

  /** Write `closed`, with the exception that ended the handler if one did. The session's lease is ended first
   * (`endLease`, when given) and `closed` says whether it was (`lease_ended`): the orchestrator then need not
   * write the session's tombstone itself. A later call (the handler's end after the deadline closed the
   * session) waits for the first and writes nothing. */
  close(exception: PipesException | null = null): Promise<void> {
    this.closing ??= this.writeClosed(exception);
    return this.closing;
  }

  private async writeClosed(exception: PipesException | null): Promise<void> {
    const params: Record<string, unknown> = exception ? {exception} : {};
    if (this.endLease !== undefined && (await this.endLease())) params[LEASE_ENDED_PARAM] = true;
    this.writeMessage('closed', params);
    this.closed = true;
  }

  // ------------------------------------------------------------------------------------------ the step

  get isAssetStep(): boolean {
    return this.data.asset_keys !== null && this.data.asset_keys !== undefined;
  }

  /** The step's asset key (`"a/b"`); an error if the step has none or several. */
  get assetKey(): string {
    const keys = defined(this.data.asset_keys, 'asset_key');
    this.assertSingleAsset('asset_key');
    return keys[0];
  }

  get assetKeys(): string[] {
    return defined(this.data.asset_keys, 'asset_keys');
  }

  get provenance(): DataProvenance | null {
    return this.ofTheAsset(this.data.provenance_by_asset_key, 'provenance');
  }

  get provenanceByAssetKey(): Record<string, DataProvenance | null> {
    return defined(this.data.provenance_by_asset_key, 'provenance_by_asset_key');
  }

  get codeVersion(): string | null {
    return this.ofTheAsset(this.data.code_version_by_asset_key, 'code_version');
  }

  get codeVersionByAssetKey(): Record<string, string | null> {
    return defined(this.data.code_version_by_asset_key, 'code_version_by_asset_key');
  }

  get isPartitionStep(): boolean {
    return this.data.partition_key_range !== null && this.data.partition_key_range !== undefined;
  }

  get partitionKey(): string {
    return defined(this.data.partition_key, 'partition_key');
  }

  get partitionKeyRange(): PartitionKeyRange {
    return defined(this.data.partition_key_range, 'partition_key_range');
  }

  /** null when the step's partitions are not time windows; an error when it has none. */
  get partitionTimeWindow(): PartitionTimeWindow | null {
    defined(this.data.partition_key_range, 'partition_time_window');
    return this.data.partition_time_window ?? null;
  }

  get runId(): string {
    return this.data.run_id;
  }

  get jobName(): string | null {
    return this.data.job_name ?? null;
  }

  get retryNumber(): number {
    return this.data.retry_number;
  }

  get extras(): Record<string, unknown> {
    return this.data.extras ?? {};
  }

  getExtra(key: string): unknown {
    if (!(key in this.extras)) {
      throw new DagsterPipesError(`Extra \`${key}\` is undefined. Extras must be provided by user.`);
    }
    return this.extras[key];
  }

  // ------------------------------------------------------------------------------------------ reports

  reportAssetMaterialization(options: MaterializationOptions = {}): void {
    const method = 'report_asset_materialization';
    const assetKey = this.resolveAssetKey(options.assetKey, method);
    if (this.materialized.has(assetKey)) {
      throw new DagsterPipesError(
        `Calling \`${method}\` with asset key \`${assetKey}\` is undefined. Asset has already been materialized, ` +
          'so no additional data can be reported for it.',
      );
    }
    const metadata = options.metadata && Object.keys(options.metadata).length ? normalizeMetadata(options.metadata, method) : null;
    const dataVersion = options.dataVersion ?? null;
    if (dataVersion !== null && typeof dataVersion !== 'string') {
      throw new DagsterPipesError(
        `Invalid type for parameter \`dataVersion\` of \`${method}\`. Expected a string, got \`${typeof dataVersion}\`.`,
      );
    }
    this.writeMessage(method, {asset_key: assetKey, data_version: dataVersion, metadata});
    this.materialized.add(assetKey);
  }

  reportAssetCheck(options: AssetCheckOptions): void {
    const method = 'report_asset_check';
    const assetKey = this.resolveAssetKey(options.assetKey, method);
    if (typeof options.checkName !== 'string') {
      throw new DagsterPipesError(`Invalid type for parameter \`checkName\` of \`${method}\`. Expected a string.`);
    }
    if (typeof options.passed !== 'boolean') {
      throw new DagsterPipesError(`Invalid type for parameter \`passed\` of \`${method}\`. Expected a boolean.`);
    }
    const severity = options.severity ?? 'ERROR';
    if (severity !== 'WARN' && severity !== 'ERROR') {
      throw new DagsterPipesError(
        `Invalid value for parameter \`severity\` of \`${method}\`. Expected "WARN" or "ERROR", got \`${String(severity)}\`.`,
      );
    }
    const metadata = options.metadata && Object.keys(options.metadata).length ? normalizeMetadata(options.metadata, method) : null;
    this.writeMessage(method, {
      asset_key: assetKey,
      check_name: options.checkName,
      passed: options.passed,
      metadata,
      severity,
    });
  }

  /** Any JSON value, for the step's `get_custom_messages()`. */
  reportCustomMessage(payload: unknown): void {
    this.writeMessage('report_custom_message', {payload: payload ?? null});
  }

  /** Text for the step's stdout or stderr (what `console.log` in a handler sends). */
  logExternalStream(stream: 'stdout' | 'stderr', text: string, extras: Record<string, unknown> | null = null): void {
    this.writeMessage('log_external_stream', {stream, text, extras: extras ?? {}});
  }

  /** The value `byKey` holds for the step's one asset; an error if the step has none or several. */
  private ofTheAsset<T>(byKey: Record<string, T | null> | null, key: string): T | null {
    const values = defined(byKey, key);
    this.assertSingleAsset(key);
    return Object.values(values)[0] ?? null;
  }

  private assertSingleAsset(key: string): void {
    if ((this.data.asset_keys ?? []).length !== 1) {
      throw new DagsterPipesError(`Missing required property: \`${key}\` is undefined. Current step targets multiple assets.`);
    }
  }

  private resolveAssetKey(assetKey: string | null | undefined, method: string): string {
    if (assetKey !== null && assetKey !== undefined && typeof assetKey !== 'string') {
      throw new DagsterPipesError(`Invalid type for parameter \`assetKey\` of \`${method}\`. Expected a string.`);
    }
    const defined = this.data.asset_keys;
    if (defined && defined.length) {
      if (assetKey && !defined.includes(assetKey)) {
        throw new DagsterPipesError(`Invalid asset key. Expected one of \`${JSON.stringify(defined)}\`, got \`${assetKey}\`.`);
      }
      if (!assetKey) {
        if (defined.length !== 1) {
          throw new DagsterPipesError(
            `Calling \`${method}\` without passing an asset key is undefined. Current step targets multiple assets: ` +
              `pass assetKey, one of ${JSON.stringify(defined)}.`,
          );
        }
        assetKey = defined[0];
      }
    }
    if (!assetKey) {
      throw new DagsterPipesError(
        `Calling \`${method}\` without passing an asset key is undefined. Current step does not target a specific asset.`,
      );
    }
    return assetKey;
  }

  private writeMessage(method: string, params: Record<string, unknown>): void {
    if (this.closed) throw new DagsterPipesError('Cannot send message after pipes context is closed.');
    this.sink.write({__dagster_pipes_version: PIPES_PROTOCOL_VERSION, method, params});
  }
}
