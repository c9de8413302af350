"""The example code location: one asset per way of running a Cloud Function from Dagster.

* ``cloud_function_pipes_asset``: one session, attached (the step waits for the function's messages);
* ``sharded_sales``: fan-out, one session per shard at bounded concurrency, one aggregated materialization;
* ``detached_sales_job`` + ``detached_completions``: detached, the step only triggers and a sensor records
  the materialization of ``detached_sales`` when the function's replies arrive;
* ``landed_objects``: sensor-triggered, a new object under ``landing/`` in a bucket (a GCS notification on
  Pub/Sub) materializes ``cloud_function_pipes_asset`` with the object's path.

Configuration comes from the environment (see the README's configuration table), so the same file serves
the local stack (``make demo``, the tests) and a real project.
"""


import os
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    Config,
    Definitions,
    MaterializeResult,
    OpExecutionContext,
    Output,
    RunConfig,
    RunRequest,
    asset,
    job,
    load_from_defs_folder,
    op,
)

from dagster_gcf_pipes.orchestrator import (
    PipesPubSubClient,
    PubSubEvent,
    gcs_object_event,
    pipes_completion_sensor,
    pubsub_sensor,
)


def data_lake() -> str:
    return os.environ.get("DATA_LAKE_BUCKET", "gs://data-lake")


class LandedObject(Config):
    """The object a run was requested for (by ``landed_objects``); empty when materialized by hand."""

    uri: str = ""


@asset(description="Fake sales data written as a Parquet table by a Cloud Function.")
def cloud_function_pipes_asset(
    context: AssetExecutionContext, config: LandedObject, pipes_pubsub: PipesPubSubClient
) -> MaterializeResult:
    payload = {"dl_bucket": data_lake()}
    if config.uri:
        payload["source_uri"] = config.uri
    return pipes_pubsub.run(context=context, payload=payload).get_materialize_result()


def landed_object_request(event: PubSubEvent) -> RunRequest | None:
    """A new object under landing/ materializes cloud_function_pipes_asset with the object's path."""
    obj = gcs_object_event(event)  # not a GCS notification: acked and skipped with a warning
    if not obj.created or not obj.name.startswith("landing/"):
        return None  # deletes, metadata updates, other prefixes: acked, no run
    return RunRequest(
        # one run per write of the object, however many notifications of it arrive
        run_key=obj.run_key,
        run_config=RunConfig(ops={"cloud_function_pipes_asset": LandedObject(uri=obj.uri)}),
        tags={"gcs/bucket": obj.bucket, "gcs/object": obj.name, "gcs/generation": obj.generation or ""},
    )


landed_objects = pubsub_sensor(
    "landed_objects",
    os.environ.get("PIPES_LANDING_SUBSCRIPTION", "landing-objects"),
    target=[cloud_function_pipes_asset],
    build_run_request=landed_object_request,
    minimum_interval_seconds=30,
)


@asset(description="Fake sales data written in four parts by four concurrent function sessions (fan-out).")
def sharded_sales(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient) -> MaterializeResult:
    payloads = [{"dl_bucket": data_lake(), "part": part, "seed": part, "rows": 250} for part in range(4)]
    return pipes_pubsub.run_many(context=context, payloads=payloads, max_concurrency=4).get_materialize_result()


detached_sales = AssetSpec("detached_sales", description="Written by a detached function session; recorded by a sensor.")


@op(description="Triggers the function for detached_sales and returns without waiting for it.")
def trigger_detached_sales(context: OpExecutionContext, pipes_pubsub: PipesPubSubClient) -> Output[None]:
    session = pipes_pubsub.run_detached(context=context, payload={"dl_bucket": data_lake()}, asset_key=detached_sales.key)
    return Output(None, metadata=session.metadata)


@job(description="Starts a detached session; detached_completions records its result.")
def detached_sales_job() -> None:
    trigger_detached_sales()


detached_completions = pipes_completion_sensor(
    name="detached_completions",
    subscription=os.environ.get("PIPES_DETACHED_SUBSCRIPTION", "pipes-detached-completions"),
    minimum_interval_seconds=15,
)


def pipes_pubsub_from_env() -> PipesPubSubClient:
    return PipesPubSubClient(
        project=os.environ.get("GOOGLE_CLOUD_PROJECT"),
        # PIPES_FUNCTION_NAME (projects/P/locations/L/functions/F) reads the trigger topic from the deployment
        function_name=os.environ.get("PIPES_FUNCTION_NAME"),
        trigger_topic=os.environ.get("PIPES_TRIGGER_TOPIC")
        or (None if os.environ.get("PIPES_FUNCTION_NAME") else "pipes-trigger"),
        reply_topic=os.environ.get("PIPES_REPLY_TOPIC", "pipes-replies"),
        detached_reply_topic=os.environ.get("PIPES_DETACHED_REPLY_TOPIC", "pipes-detached-replies"),
        bucket=os.environ.get("PIPES_BUCKET", "pipes-payloads"),
    )


defs = Definitions(
    assets=[cloud_function_pipes_asset, sharded_sales, detached_sales],
    jobs=[detached_sales_job],
    sensors=[detached_completions, landed_objects],
    resources={"pipes_pubsub": pipes_pubsub_from_env()},
)

# and the assets declared in YAML: every component instance under defs/ (here yaml_sales/defs.yaml)
defs = Definitions.merge(defs, load_from_defs_folder(path_within_project=Path(__file__).parent))
