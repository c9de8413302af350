// The example business function, in Node.js: fake sales rows written as CSV to the data-lake bucket.
//
// Dagster triggers it over Pub/Sub (PipesPubSubClient.run, payload {"dl_bucket": "gs://...", "rows": N}) and
// sees its log lines, prints, materialization and custom message. Locally: `npm start` (the Functions
// Framework, with PUBSUB_EMULATOR_HOST / STORAGE_EMULATOR_HOST set) or `python try_local.py`; deployed:
// `gcloud functions deploy ... --gen2 --runtime nodejs20 --trigger-topic TOPIC --entry-point main`.
import {setTimeout as sleep} from 'node:timers/promises';

import {cloudEvent} from '@google-cloud/functions-framework';
import {pipesFunction, storage} from '@dagster-gcf-pipes/function';

const REGIONS = ['emea', 'amer', 'apac'];

/** `rows` rows of fake orders, the same for the same seed. */
function fakeSales(rows, seed) {
  let state = seed >>> 0 || 1;
  const next = () => (state = (Math.imul(state, 1664525) + 1013904223) >>> 0) / 2 ** 32;
  const lines = ['order_id,region,amount'];
  let total = 0;
  for (let id = 1; id <= rows; id++) {
    const amount = Math.round((5 + next() * 495) * 100) / 100;
    total += amount;
    lines.push(`${id},${REGIONS[Math.floor(next() * REGIONS.length)]},${amount.toFixed(2)}`);
  }
  return {csv: lines.join('\n') + '\n', total: Math.round(total * 100) / 100};
}

export const main = pipesFunction(async (pipes, payload) => {
  const bucket = String(payload.dl_bucket ?? 'gs://data-lake').replace(/^gs:\/\//, '').replace(/\/+$/, '');
  const rows = Number(payload.rows ?? 1000);
  if (payload.fail) throw new Error(`asked to fail: ${payload.fail}`);

  pipes.log.info(`generating ${rows} rows of fake sales data`);
  console.log(`printed by the handler: ${rows} rows`); // reaches the step's stdout
  const {csv, total} = fakeSales(rows, Number(payload.seed ?? 0));
  for (let second = 0; second < Number(payload.work_seconds ?? 0); second++) {
    pipes.raiseIfCancelled(); // the run was terminated, or the function's timeout is near: stop here
    await sleep(1000);
  }

  const path = `sales/${pipes.assetKey.replaceAll('/', '_')}/part-${Number(payload.part ?? 0)}.csv`;
  pipes.log.info(`writing ${rows} rows to gs://${bucket}/${path}`);
  await storage().bucket(bucket).file(path).save(csv, {contentType: 'text/csv', resumable: false});

  pipes.reportAssetMaterialization({
    metadata: {
      table_location: {raw_value: `gs://${bucket}/${path}`, type: 'url'},
      row_count: {raw_value: rows, type: 'int'},
      total_amount: {raw_value: total, type: 'float'},
      runtime: {raw_value: `node ${process.versions.node}`, type: 'text'},
    },
  });
  pipes.reportCustomMessage({rows, total});
});

// registered, the Functions Framework needs no --signature-type
cloudEvent('main', main);
