// The conformance kit's function in Node.js (tests/conformance/test_kit.py): the same behaviours as
// ../python/main.py, chosen by the payload's `case` (several joined by `+`). Marks under gs://LAKE/kit/ tell
// the kit what ran.
import {createHash, randomUUID} from 'node:crypto';
import {setTimeout as sleep} from 'node:timers/promises';

import {pipesFunction, storage} from '@dagster-gcf-pipes/function';

const LEVELS = ['debug', 'info', 'warning', 'error', 'critical'];

function blob(payload, kind) {
  return storage().bucket(payload.lake).file(`kit/${kind}/${payload.token}`);
}

async function mark(payload, kind) {
  await blob(payload, kind).save(kind, {resumable: false});
}

/** Wait up to `seconds` for the kit's go mark, or until the session is cancelled; true if cancelled. */
async function waitForGoOrCancel(pipes, payload, seconds) {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    if (pipes.isCancelled) return true;
    const [exists] = await blob(payload, 'go').exists();
    if (exists) return false;
    await sleep(50);
  }
  return pipes.isCancelled;
}

function fail_deep(token) {
  try {
    JSON.parse('not json');
  } catch (cause) {
    throw new Error(`kit failure ${token}`, {cause});
  }
}

const CASES = {
  logs(pipes, payload) {
    for (const level of LEVELS) pipes.log[level](`${payload.tag} ${level}`);
  },
  checks(pipes, payload) {
    for (const check of payload.checks) {
      pipes.reportAssetCheck({
        assetKey: pipes.assetKeys[0],
        checkName: check.name,
        passed: check.passed,
        severity: check.severity,
        metadata: check.metadata,
      });
    }
  },
  custom(pipes, payload) {
    for (const message of payload.messages) pipes.reportCustomMessage(message);
  },
  extras(pipes) {
    pipes.reportCustomMessage({extras: pipes.extras, region: pipes.getExtra('region')});
  },
  error(pipes, payload) {
    fail_deep(payload.token);
  },
  claim_check(pipes, payload) {
    const pad = payload.pad;
    pipes.reportCustomMessage({pad_sha256: createHash('sha256').update(pad).digest('hex'), pad_length: pad.length});
    pipes.reportCustomMessage('r'.repeat(payload.reply_chars));
  },
  prints(pipes, payload) {
    console.log(`${payload.tag} stdout`);
    console.error(`${payload.tag} stderr`);
  },
  async wait(pipes, payload) {
    await waitForGoOrCancel(pipes, payload, payload.seconds);
  },
  async until_cancelled(pipes, payload) {
    // once cancelled, a line a moment later (after `closed` when the function's deadline cancelled the
    // session: it must not reach the step), then stop
    if (await waitForGoOrCancel(pipes, payload, payload.seconds)) {
      await mark(payload, 'cancel-observed');
      await sleep(300);
      try {
        pipes.log.info(`${payload.tag} after the end`);
      } finally {
        pipes.raiseIfCancelled();
      }
    }
  },
};

export const main = pipesFunction(async (pipes, payload) => {
  const names = payload.case.split('+'); // several cases, run in order: "logs+checks"
  const unknown = names.filter((name) => !Object.hasOwn(CASES, name));
  if (unknown.length) throw new Error(`no such kit case: ${unknown}`);
  if (payload.token) {
    await storage().bucket(payload.lake).file(`kit/runs/${payload.token}/${randomUUID()}`).save('run', {resumable: false});
    await mark(payload, 'started');
  }
  for (const name of names) await CASES[name](pipes, payload);
  for (const key of pipes.isAssetStep ? pipes.assetKeys : []) {
    pipes.reportAssetMaterialization({
      assetKey: key,
      dataVersion: `${payload.case}-${key}`,
      metadata: {
        case: payload.case,
        ...(pipes.isPartitionStep ? {partition: pipes.partitionKey} : {}),
        rows: {raw_value: 3, type: 'int'},
        ratio: {raw_value: 2, type: 'float'},
      },
    });
  }
});
