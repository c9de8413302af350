/**
 * Process-wide Google clients, created on first use and reused by every invocation on a warm instance
 * (Google's advice for Cloud Functions). Credentials and endpoints come from the environment as every
 * Google client library reads them: ADC in the cloud, `PUBSUB_EMULATOR_HOST` / `STORAGE_EMULATOR_HOST` locally.
 */
import {PubSub, Topic} from '@google-cloud/pubsub';
import {Storage} from '@google-cloud/storage';

import {GCSBlobStore} from './claimCheck';
import {Attributes} from './protocol';
import {withRetry, withTimeout} from './retry';

export function projectFromEnvironment(): string | undefined {
  return process.env.GOOGLE_CLOUD_PROJECT || process.env.GCLOUD_PROJECT || process.env.GCP_PROJECT || undefined;
}

let storageClient: Storage | undefined;
let pubsubClient: PubSub | undefined;

/** The process's Cloud Storage client (also yours: `storage()` in a handler shares its connections, and
 * reaches the local stack's emulator). */
export function storage(): Storage {
  storageClient ??= newStorage();
  return storageClient;
}

/** `STORAGE_EMULATOR_HOST` is the emulator's origin for the Python client (`http://127.0.0.1:PORT`, as the
 * local stack sets it). The Node client takes the variable as its JSON API's base URL and uploads to
 * `${apiEndpoint}/upload/storage/v1`, so no one spelling serves both its reads and its uploads: with the
 * variable set, the client gets the origin as its endpoint and the JSON API under it. */
function newStorage(): Storage {
  const emulator = process.env.STORAGE_EMULATOR_HOST;
  if (!emulator) return new Storage({projectId: projectFromEnvironment()});
  const origin = new URL(emulator.includes('://') ? emulator : `http://${emulator}`).origin;
  const client = new Storage({projectId: projectFromEnvironment(), apiEndpoint: origin});
  client.baseUrl = `${origin}/storage/v1`;
  return client;
}

export function blobStore(bucket: string): GCSBlobStore {
  return new GCSBlobStore(storage(), bucket);
}

/** Publishes one message and waits for Pub/Sub to accept it: the reply writer's only need of Pub/Sub. */
export interface Publisher {
  publish(topic: string, data: Buffer, attributes: Attributes, timeoutSeconds: number): Promise<string>;
}

/** The Pub/Sub publisher: no client-side batching (the writer batches Pipes messages itself and waits for
 * each publish), transient errors retried for up to 120 s, each attempt bounded by `timeoutSeconds`. */
export class PubSubPublisher implements Publisher {
  private readonly topics = new Map<string, Topic>();

  constructor(private readonly client: PubSub) {}

  private topic(name: string): Topic {
    let topic = this.topics.get(name);
    if (topic === undefined) {
      topic = this.client.topic(name, {batching: {maxMessages: 1, maxMilliseconds: 0}});
      this.topics.set(name, topic);
    }
    return topic;
  }

  publish(topic: string, data: Buffer, attributes: Attributes, timeoutSeconds: number): Promise<string> {
    return withRetry(
      `publishing to ${topic}`,
      () => withTimeout(`publishing to ${topic}`, this.topic(topic).publishMessage({data, attributes}), timeoutSeconds),
      {maxSeconds: 120},
    );
  }
}

let publisherInstance: PubSubPublisher | undefined;

export function publisher(): PubSubPublisher {
  pubsubClient ??= new PubSub({projectId: projectFromEnvironment()});
  publisherInstance ??= new PubSubPublisher(pubsubClient);
  return publisherInstance;
}
