/**
 * JSON as Python's `json.dumps` writes it, byte for byte: the Python side writes every byte this package
 * must match (reply batches, the lease object, the signing canonical form), and its defaults are not
 * `JSON.stringify`'s:
 *
 * - `ensure_ascii`: every character outside printable ASCII is a `\uXXXX` escape (lowercase hex; astral
 *   characters as their surrogate pair), DEL (0x7f) too;
 * - floats as Python's `repr`: `1.0` (never `1`), `1e+16`, `1.5e-05`. NaN and the infinities are refused
 *   (docs/protocol.md: RFC 8259 JSON everywhere), where the Python writer lets `json.dumps` write `NaN`;
 * - separators `", "` and `": "` unless compact ones are asked for; keys sorted by code point on request.
 *
 * JavaScript has one number type: an integral number is written as an integer (as Python writes an `int`),
 * anything else as a float. A value Python holds as a float whatever its value (a lease's `expires_at`) is
 * passed as a `PyFloat`. Otherwise the value model is `JSON.stringify`'s: `toJSON` is called, `undefined`,
 * functions and symbols are left out of objects and written `null` in arrays; what JSON cannot carry
 * (a cycle, a `Map`, a `Set`, NaN) is a `TypeError` naming where it is.
 */

/** A number Python holds as a `float`: written `1.0`, never `1`. */
export class PyFloat {
  constructor(readonly value: number) {}
}

export interface DumpsOptions {
  /** `(item separator, key separator)`; Python's default is `[", ", ": "]`. */
  separators?: readonly [string, string];
  sortKeys?: boolean;
}

export const COMPACT: readonly [string, string] = [',', ':'];

/** `repr(float(x))` of a finite `x`: the shortest digits that round-trip (JavaScript's too), laid out as
 * Python does. */
export function pyFloatRepr(x: number): string {
  if (!Number.isFinite(x)) throw new RangeError(`${x} is not a finite number`);
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const [mantissa, exponent] = x.toExponential().split('e');
  const sign = mantissa.startsWith('-') ? '-' : '';
  const digits = mantissa.replace('-', '').replace('.', '');
  const e = Number(exponent);
  if (e < -4 || e >= 16) {
    const head = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    return `${sign}${head}e${e < 0 ? '-' : '+'}${String(Math.abs(e)).padStart(2, '0')}`;
  }
  if (e < 0) return `${sign}0.${'0'.repeat(-e - 1)}${digits}`;
  const whole = digits.slice(0, e + 1).padEnd(e + 1, '0');
  const fraction = digits.slice(e + 1) || '0';
  return `${sign}${whole}.${fraction}`;
}

const SIMPLE_ESCAPES: Record<string, string> = {
  '"': '\\"',
  '\\': '\\\\',
  '\n': '\\n',
  '\r': '\\r',
  '\t': '\\t',
  '\b': '\\b',
  '\f': '\\f',
};

/** A JSON string literal as `json.dumps(s)` (ensure_ascii) writes it. */
export function pyString(s: string): string {
  // eslint-disable-next-line no-control-regex
  const escaped = s.replace(/[\\"\u0000-\u001f\u007f-\uffff]/g, (c) => {
    return SIMPLE_ESCAPES[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
  });
  return `"${escaped}"`;
}

function byCodePoint(a: string, b: string): number {
  const x = Array.from(a);
  const y = Array.from(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0)! - y[i].codePointAt(0)!;
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

function isSkipped(value: unknown): boolean {
  return value === undefined || typeof value === 'function' || typeof value === 'symbol';
}

/** `json.dumps(value, separators=..., sort_keys=...)` as Python writes it (see the module comment). */
export function dumps(value: unknown, options: DumpsOptions = {}): string {
  const [itemSep, keySep] = options.separators ?? [', ', ': '];
  const sortKeys = options.sortKeys ?? false;
  const seen = new Set<object>();

  const encode = (v: unknown, where: string): string => {
    if (v !== null && typeof v === 'object' && typeof (v as {toJSON?: unknown}).toJSON === 'function') {
      v = (v as {toJSON: (key: string) => unknown}).toJSON('');
    }
    if (v === null) return 'null';
    const number = v instanceof PyFloat ? v.value : v;
    if (typeof number === 'number' && !Number.isFinite(number)) {
      throw new TypeError(`${where} is ${number}, which JSON cannot carry: send null, or a string`);
    }
    if (v instanceof PyFloat) return pyFloatRepr(v.value);
    switch (typeof v) {
      case 'boolean':
        return v ? 'true' : 'false';
      case 'number':
        return Number.isSafeInteger(v) ? String(v) : pyFloatRepr(v);
      case 'bigint':
        return v.toString();
      case 'string':
        return pyString(v);
      case 'object':
        break;
      default:
        throw new TypeError(`${where} is a ${typeof v}, which JSON cannot carry`);
    }
    const obj = v as object;
    if (obj instanceof Map || obj instanceof Set) {
      throw new TypeError(
        `${where} is a ${obj.constructor.name}, which JSON cannot carry: pass a plain object or an array`,
      );
    }
    if (seen.has(obj)) throw new TypeError(`${where} contains itself (a cycle), which JSON cannot carry`);
    seen.add(obj);
    try {
      if (Array.isArray(obj)) {
        const items = obj.map((item, i) => (isSkipped(item) ? 'null' : encode(item, `${where}[${i}]`)));
        return `[${items.join(itemSep)}]`;
      }
      const record = obj as Record<string, unknown>;
      const keys = Object.keys(record).filter((k) => !isSkipped(record[k]));
      if (sortKeys) keys.sort(byCodePoint);
      const members = keys.map((k) => `${pyString(k)}${keySep}${encode(record[k], `${where}.${k}`)}`);
      return `{${members.join(itemSep)}}`;
    } finally {
      seen.delete(obj);
    }
  };

  if (isSkipped(value)) throw new TypeError(`the value is ${String(value)}, which JSON cannot carry`);
  return encode(value, 'value');
}
