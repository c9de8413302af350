/**
 * Claim-check codec (shared/claim_check.py): a body travels inline up to a threshold, else as a `gs://`
 * pointer to an object holding it; the `dagster_pipes_body` attribute says which (`inline` or `claim`).
 */
import type {Storage} from '@google-cloud/storage';

import {Attr, Attributes, MAX_CLAIM_BYTES, ProtocolError, validateThreshold} from './protocol';
import {statusOf, withRetry} from './retry';

export const INLINE = 'inline';
export const CLAIM = 'claim';

export interface BlobStore {
  /** Store `data` under `key` and return its URL. */
  put(key: string, data: Buffer): Promise<string>;
  /** The bytes at `url`; `ProtocolError` if there is no such object or it is larger than `maxBytes`. */
  get(url: string, maxBytes: number): Promise<Buffer>;
}

export function parseGsUrl(url: string): [bucket: string, key: string] {
  const rest = url.startsWith('gs://') ? url.slice(5) : '';
  const slash = rest.indexOf('/');
  if (slash < 0) {
    throw new ProtocolError(`claim-check pointer is not a gs://BUCKET/KEY URL: ${JSON.stringify(url.slice(0, 200))}`);
  }
  return [rest.slice(0, slash), rest.slice(slash + 1)];
}

/** A `BlobStore` on one GCS bucket, transient errors retried. */
export class GCSBlobStore implements BlobStore {
  constructor(
    readonly storage: Storage,
    readonly bucket: string,
  ) {}

  async put(key: string, data: Buffer): Promise<string> {
    const file = this.storage.bucket(this.bucket).file(key);
    await withRetry(`uploading gs://${this.bucket}/${key}`, () =>
      file.save(data, {contentType: 'application/json', resumable: false}),
    );
    return `gs://${this.bucket}/${key}`;
  }

  /** The object's size is read first, and the download is pinned to the generation that was checked. */
  async get(url: string, maxBytes: number = MAX_CLAIM_BYTES): Promise<Buffer> {
    const [bucket, key] = parseGsUrl(url);
    return withRetry(`reading ${url}`, async () => {
      let metadata;
      try {
        [metadata] = await this.storage.bucket(bucket).file(key).getMetadata();
      } catch (error) {
        if (statusOf(error) === 404) {
          throw new ProtocolError(`claim-check object ${url} does not exist (deleted, or never written)`);
        }
        throw error;
      }
      const size = metadata.size === undefined ? undefined : Number(metadata.size);
      if (size === undefined || !(size <= maxBytes)) {
        throw new ProtocolError(
          `claim-check object ${url} is ${metadata.size} bytes, above the ${maxBytes}-byte cap: not downloaded`,
        );
      }
      const pinned = this.storage.bucket(bucket).file(key, {generation: Number(metadata.generation)});
      try {
        const [data] = await pinned.download();
        return data;
      } catch (error) {
        if (statusOf(error) === 404) throw new ProtocolError(`claim-check object ${url} was replaced or deleted while being read`);
        throw error;
      }
    });
  }
}

export class ClaimCheck {
  constructor(
    readonly store: BlobStore,
    readonly threshold: number,
  ) {
    validateThreshold(threshold);
  }

  /** The message data and the codec attribute for `body`; bodies over the threshold go to `key`. */
  async wrap(body: Buffer, key: string): Promise<{data: Buffer; attributes: Attributes}> {
    if (body.length <= this.threshold) return {data: body, attributes: {[Attr.BODY]: INLINE}};
    if (body.length > MAX_CLAIM_BYTES) {
      throw new ProtocolError(
        `a message body of ${body.length} bytes is above the ${MAX_CLAIM_BYTES}-byte claim-check cap, which no ` +
          'reader downloads: send less at once (write large data to your own storage and report where)',
      );
    }
    const url = await this.store.put(key, body);
    return {data: Buffer.from(url, 'utf-8'), attributes: {[Attr.BODY]: CLAIM}};
  }
}

/** The body `data` carries: itself, or the object its pointer names. */
export async function unwrap(store: BlobStore, data: Buffer, attributes: Attributes): Promise<Buffer> {
  const encoding = attributes[Attr.BODY] ?? INLINE;
  if (encoding === INLINE) return data;
  if (encoding === CLAIM) {
    let url: string;
    try {
      url = new TextDecoder('utf-8', {fatal: true}).decode(data);
    } catch {
      throw new ProtocolError('claim-check pointer is not UTF-8');
    }
    parseGsUrl(url);
    return store.get(url, MAX_CLAIM_BYTES);
  }
  throw new ProtocolError(
    `unknown '${Attr.BODY}' attribute ${JSON.stringify(encoding)} (expected '${INLINE}' or '${CLAIM}')`,
  );
}
