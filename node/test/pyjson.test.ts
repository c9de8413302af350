import assert from 'node:assert/strict';
import {test} from 'node:test';

import {COMPACT, PyFloat, dumps, pyFloatRepr} from '../src/pyjson';
import {python} from './fixtures';

test('floats are written as Python writes them (repr, json.dumps, str)', () => {
  for (const {value, dumps: expected, str} of python.json.floats) {
    const x = Number(value);
    assert.equal(pyFloatRepr(x), str, `str(${value})`);
    assert.equal(dumps(new PyFloat(x)), expected, `json.dumps(${value})`);
  }
});

test('integral numbers are written as Python ints, others as floats', () => {
  for (const {value, dumps: expected} of python.json.ints) assert.equal(dumps(value), expected);
  assert.equal(dumps(2.5), '2.5');
  assert.equal(dumps(1e21), '1e+21');
  assert.equal(dumps(10n ** 30n), '1000000000000000000000000000000');
});

test('strings are escaped as ensure_ascii does', () => {
  for (const {value, dumps: expected} of python.json.strings) assert.equal(dumps(value), expected, JSON.stringify(value));
  assert.equal(dumps('\ud800'), python.json.lone_surrogate_dumps);
});

test('separators, key order and sort_keys', () => {
  const value = {b: [1, {z: null, a: true}], a: 'x'};
  assert.equal(dumps(value), '{"b": [1, {"z": null, "a": true}], "a": "x"}');
  assert.equal(dumps(value, {separators: COMPACT}), '{"b":[1,{"z":null,"a":true}],"a":"x"}');
  assert.equal(dumps(value, {separators: COMPACT, sortKeys: true}), '{"a":"x","b":[1,{"a":true,"z":null}]}');
  // code point order, as Python sorts: an astral character after U+FFFF's neighbours
  assert.equal(dumps({'\u{1F600}': 1, '\uFF01': 2}, {sortKeys: true, separators: COMPACT}), '{"\\uff01":2,"\\ud83d\\ude00":1}');
});

test("JSON.stringify's value model: toJSON, undefined and functions left out", () => {
  const value = {when: new Date(0), gone: undefined, fn: () => 1, list: [undefined, () => 1]};
  assert.equal(dumps(value, {separators: COMPACT}), '{"when":"1970-01-01T00:00:00.000Z","list":[null,null]}');
});

test('what JSON cannot carry is a TypeError naming where it is', () => {
  const cyclic: Record<string, unknown> = {};
  cyclic.self = cyclic;
  assert.throws(() => dumps({a: cyclic}), /value\.a\.self contains itself/);
  assert.throws(() => dumps({m: new Map()}), /value\.m is a Map/);
  assert.throws(() => dumps(undefined), /which JSON cannot carry/);
  assert.throws(() => dumps({x: [NaN]}), /value\.x\[0\] is NaN, which JSON cannot carry/);
  assert.throws(() => dumps(new PyFloat(-Infinity)), /value is -Infinity/);
});
