/** Where a session's objects live in the bucket (shared/layout.py): everything of a session under one
 * prefix, except its lease, which outlives the session as its tombstone under `PREFIX/leases/`. */

function trimmed(prefix: string): string {
  return prefix.replace(/^\/+|\/+$/g, '');
}

export function sessionPrefix(prefix: string, sessionId: string): string {
  return trimmed(prefix) ? `${trimmed(prefix)}/${sessionId}/` : `${sessionId}/`;
}

export function triggerKey(prefix: string, sessionId: string): string {
  return `${sessionPrefix(prefix, sessionId)}trigger.json`;
}

export function contextKey(prefix: string, sessionId: string): string {
  return `${sessionPrefix(prefix, sessionId)}context.json`;
}

export function leasesPrefix(prefix: string): string {
  return trimmed(prefix) ? `${trimmed(prefix)}/leases/` : 'leases/';
}

export function leaseKey(prefix: string, sessionId: string): string {
  return leasesPrefix(prefix) + sessionId;
}

export function replyKey(prefix: string, sessionId: string, invocationId: string, seq: number): string {
  return `${sessionPrefix(prefix, sessionId)}replies/${invocationId}/${seq}.json`;
}
