/** The Python side's encodings of fixed inputs (fixtures/python.json, printed by fixtures/generate.py). */
import {readFileSync} from 'node:fs';
import {join} from 'node:path';

// compiled to build-test/test/: the fixtures stay beside the sources
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export const python: any = JSON.parse(readFileSync(join(__dirname, '..', '..', 'test', 'fixtures', 'python.json'), 'utf-8'));
