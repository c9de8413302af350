"""The example code location: the seed's ``cloud_function_pipes_asset``, materialized by a Cloud Function.

Configuration comes from the environment (see the README's configuration table), so the same file serves
the local stack (``make demo`` / ``make dev``) and a real project.
"""


import os

from dagster import AssetExecutionContext, Definitions, MaterializeResult, asset

from orchestrator.client import PipesPubSubClient


@asset(description="Fake sales data written as a Parquet table by a Cloud Function.")
def cloud_function_pipes_asset(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient) -> MaterializeResult:
    dl_bucket = os.environ.get("DATA_LAKE_BUCKET", "gs://data-lake")
    return pipes_pubsub.run(context=context, payload={"dl_bucket": dl_bucket}).get_materialize_result()


def pipes_pubsub_from_env() -> PipesPubSubClient:
    return PipesPubSubClient(
        project=os.environ.get("GOOGLE_CLOUD_PROJECT"),
        trigger_topic=os.environ.get("PIPES_TRIGGER_TOPIC", "pipes-trigger"),
        reply_topic=os.environ.get("PIPES_REPLY_TOPIC", "pipes-replies"),
        bucket=os.environ.get("PIPES_BUCKET", "pipes-payloads"),
    )


defs = Definitions(assets=[cloud_function_pipes_asset], resources={"pipes_pubsub": pipes_pubsub_from_env()})
