/** What runs around the handler: prints forwarded to Dagster, the lease watch, the deadline. */
import assert from 'node:assert/strict';
import {test} from 'node:test';

import {Cancellation, deadlineMargin, monotonic, watchSession} from '../src/cancellation';
import {log} from '../src/logs';
import {sleep} from '../src/retry';
import {Stream, captureOutput, chunks} from '../src/stdio';

class Streams {
  sent: [Stream, string][] = [];
  logExternalStream(stream: Stream, text: string): void {
    this.sent.push([stream, text]);
  }
  text(stream: Stream): string {
    return this.sent.filter(([s]) => s === stream).map(([, t]) => t).join('');
  }
}

test("prints reach the session that made them: console.log and console.error, awaits and timers included", async () => {
  const a = new Streams();
  const b = new Streams();
  await Promise.all([
    captureOutput(a, async () => {
      console.log('a stdout 1');
      await sleep(20);
      console.error('a stderr 1');
      await new Promise<void>((resolve) => setTimeout(() => (console.log('a from a timer'), resolve()), 10));
      process.stdout.write('a unfinished line');
    }),
    captureOutput(b, async () => {
      await sleep(5);
      console.log('b stdout 1');
      log.info('test', 'the library\'s own line: never forwarded');
    }),
  ]);
  assert.equal(a.text('stdout'), 'a stdout 1\na from a timer\na unfinished line');
  assert.equal(a.text('stderr'), 'a stderr 1\n');
  assert.equal(b.text('stdout'), 'b stdout 1\n');
  assert.equal(b.text('stderr'), '');
});

test('a write from outside any session goes to the only session running', async () => {
  const only = new Streams();
  let outside: () => void = () => {};
  const elsewhere = new Promise<void>((resolve) => (outside = resolve));
  setTimeout(() => {
    console.log('written outside'); // not in the session's async context
    outside();
  }, 10);
  await captureOutput(only, async () => {
    await elsewhere;
  });
  // (the test runner's own reports, written outside too while this test runs, may come along)
  assert.ok(only.text('stdout').includes('written outside\n'));
});

test('forwarded text is cut after a newline where it can be, and sent every interval', async () => {
  assert.deepEqual([...chunks('ab\ncd\nef', 4)], ['ab\n', 'cd\n', 'ef']);
  assert.deepEqual([...chunks('abcdefgh', 3)], ['abc', 'def', 'gh']);
  const s = new Streams();
  const work = captureOutput(s, async () => {
    console.log('first');
    await sleep(250); // two intervals of 0.1 s: 'first' went on its own
    console.log('second');
  });
  await Promise.all([work, captureOutput(new Streams(), () => work)]); // two sessions: the runner's writes go to neither
  assert.deepEqual(s.sent, [['stdout', 'first\n'], ['stdout', 'second\n']]);
});

test('the lease watch: checked before the handler, then every interval; a reason cancels', async () => {
  const cancellation = new Cancellation();
  let calls = 0;
  const stop = await watchSession(async () => (++calls >= 3 ? 'the orchestrator ended the session (terminated)' : null), cancellation, {
    interval: 0.02,
    deadline: null,
    onDeadline: () => assert.fail('no deadline'),
  });
  assert.equal(calls, 1);
  await sleep(150);
  await stop();
  assert.equal(cancellation.isSet, true);
  assert.match(cancellation.reason, /terminated/);
  assert.equal(calls, 3); // no more checks once cancelled
});

test('the lease watch survives a failing check, calls onDeadline once at the deadline, and its stop waits for it', async () => {
  const cancellation = new Cancellation();
  let deadlines = 0;
  let closedAtDeadline = false;
  const stop = await watchSession(async () => Promise.reject(Object.assign(new Error('unavailable'), {code: 503})), cancellation, {
    interval: 0.01,
    deadline: monotonic() + 0.05,
    onDeadline: async () => {
      deadlines++;
      await sleep(200); // the session's close: the lease ended, then `closed`
      closedAtDeadline = true;
    },
  });
  await sleep(150);
  assert.equal(closedAtDeadline, false);
  await stop();
  assert.equal(closedAtDeadline, true);
  assert.equal(deadlines, 1);
  assert.equal(cancellation.isSet, false);
  assert.equal(deadlineMargin(540), 10);
  assert.equal(deadlineMargin(15), 1.5);
});
