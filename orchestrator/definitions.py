"""The example code location: one asset per way of running a Cloud Function from Dagster.

* ``cloud_function_pipes_asset``: one session, attached (the step waits for the function's messages);
* ``sharded_sales``: fan-out, one session per shard at bounded concurrency, one aggregated materialization;
* ``detached_sales_job`` + ``detached_completions``: detached, the step only triggers and a sensor records
  the materialization of ``detached_sales`` when the function's replies arrive.

Configuration comes from the environment (see the README's configuration table), so the same file serves
the local stack (``make demo`` / ``make dev``) and a real project.
"""


import os

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    Definitions,
    MaterializeResult,
    OpExecutionContext,
    Output,
    asset,
    job,
    op,
)

from orchestrator.client import PipesPubSubClient
from orchestrator.detached import pipes_completion_sensor


def data_lake() -> str:
    return os.environ.get("DATA_LAKE_BUCKET", "gs://data-lake")


@asset(description="Fake sales data written as a Parquet table by a Cloud Function.")
def cloud_function_pipes_asset(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient) -> MaterializeResult:
    return pipes_pubsub.run(context=context, payload={"dl_bucket": data_lake()}).get_materialize_result()


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
        trigger_topic=os.environ.get("PIPES_TRIGGER_TOPIC", "pipes-trigger"),
        reply_topic=os.environ.get("PIPES_REPLY_TOPIC", "pipes-replies"),
        detached_reply_topic=os.environ.get("PIPES_DETACHED_REPLY_TOPIC", "pipes-detached-replies"),
        bucket=os.environ.get("PIPES_BUCKET", "pipes-payloads"),
    )


defs = Definitions(
    assets=[cloud_function_pipes_asset, sharded_sales, detached_sales],
    jobs=[detached_sales_job],
    sensors=[detached_completions],
    resources={"pipes_pubsub": pipes_pubsub_from_env()},
)
