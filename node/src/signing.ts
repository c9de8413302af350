/**
 * Optional authenticity of replies (shared/signing.py): an HMAC-SHA256 over the body, before the
 * claim-check, and the protocol attributes, with a secret both sides hold.
 */
import {createHmac} from 'node:crypto';

import {Attr, Attributes} from './protocol';
import {COMPACT, dumps} from './pyjson';

/** Where the function finds the shared secret. */
export const SECRET_ENV_VAR = 'DAGSTER_PIPES_SIGNING_SECRET';

/** Not covered: the signature itself, the claim-check encoding, and what the client library adds. */
const UNSIGNED: ReadonlySet<string> = new Set([Attr.SIGNATURE, Attr.BODY]);
const UNSIGNED_PREFIX = 'googclient_';

/** `json.dumps(signed attributes, sort_keys=True, separators=(",", ":"))`, a newline, the body. */
export function canonical(body: Buffer, attributes: Attributes): Buffer {
  const signed: Attributes = {};
  for (const [key, value] of Object.entries(attributes)) {
    if (!UNSIGNED.has(key) && !key.startsWith(UNSIGNED_PREFIX)) signed[key] = value;
  }
  return Buffer.concat([Buffer.from(dumps(signed, {sortKeys: true, separators: COMPACT}) + '\n', 'utf-8'), body]);
}

export function signature(secret: string, body: Buffer, attributes: Attributes): string {
  return createHmac('sha256', Buffer.from(secret, 'utf-8')).update(canonical(body, attributes)).digest('hex');
}

/** `attributes` plus the signature attribute. */
export function sign(secret: string, body: Buffer, attributes: Attributes): Attributes {
  return {...attributes, [Attr.SIGNATURE]: signature(secret, body, attributes)};
}
