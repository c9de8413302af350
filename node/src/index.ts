/**
 * @dagster-gcf-pipes/function: the Node.js function side of dagster-gcf-pipes. A handler wrapped by
 * `pipesFunction` runs as a Cloud Function triggered over Pub/Sub and reports to Dagster through Dagster
 * Pipes, over the same wire protocol (v1) as the Python function side. Modules not exported here are
 * internal.
 */
export {pipesFunction, isPipesFunction} from './entrypoint';
export type {PipesCloudEventFunction} from './entrypoint';
export {DagsterPipesError, PipesContext, PipesLogger, SessionCancelled, SessionTimeout} from './context';
export type {
  AssetCheckOptions,
  AssetCheckSeverity,
  DataProvenance,
  MaterializationOptions,
  Metadata,
  MetadataType,
  MetadataValue,
  PartitionKeyRange,
  PartitionTimeWindow,
} from './context';
export type {Handler, Payload, SessionOutcome} from './session';
export {storage} from './clients';
