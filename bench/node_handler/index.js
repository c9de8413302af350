// bench/handler.py's `work` in Node.js: the benchmark's Node.js row (python -m bench) runs it behind the same
// dispatcher and production-semantics layer as the Python function, through @dagster-gcf-pipes/function.
import {cloudEvent} from '@google-cloud/functions-framework';
import {pipesFunction} from '@dagster-gcf-pipes/function';

export const main = pipesFunction(async (pipes, payload) => {
  pipes.log.info('first line');
  for (let i = 0; i < Number(payload.log_lines ?? 0); i++) pipes.log.info(`line ${i}`);
  const metadataBytes = Number(payload.metadata_bytes ?? 0);
  pipes.reportAssetMaterialization({metadata: {blob: {raw_value: 'm'.repeat(metadataBytes), type: 'text'}}});
});

cloudEvent('main', main);
