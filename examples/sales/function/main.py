"""The example business function: fake sales data written as a Parquet table to the data-lake bucket.

Deploy with ``gcloud functions deploy ... --gen2 --trigger-topic TOPIC --entry-point main``; locally the
Functions Framework serves it (``--target=main --signature-type=cloudevent``). Only the decorator is
imported from the integration: the business code has no transport code in it.
"""

from __future__ import annotations

import io
import random
from datetime import date, timedelta
from typing import Any

import polars as pl
from dagster_pipes import PipesContext

from dagster_gcf_pipes.function import pipes_function, storage_client


def fake_sales(rows: int, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    start = date(2026, 1, 1)
    return pl.DataFrame(
        {
            "order_id": list(range(1, rows + 1)),
            "order_date": [start + timedelta(days=rng.randrange(365)) for _ in range(rows)],
            "region": [rng.choice(["emea", "amer", "apac"]) for _ in range(rows)],
            "amount": [round(rng.uniform(5, 500), 2) for _ in range(rows)],
        }
    )


@pipes_function
def main(pipes: PipesContext, payload: dict[str, Any]) -> None:
    dl_bucket = str(payload["dl_bucket"]).removeprefix("gs://").rstrip("/")
    rows = int(payload.get("rows", 1000))
    part = int(payload.get("part", 0))  # fan-out shards each write their own part of the table
    table_path = f"sales/{pipes.asset_key.replace('/', '_')}/part-{part}.parquet"
    if payload.get("source_uri"):  # set when a sensor requested the run for a landed object
        pipes.log.info(f"triggered by {payload['source_uri']}")
    pipes.log.info(f"generating {rows} rows of fake sales data")
    table = fake_sales(rows, seed=int(payload.get("seed", 0)))

    buffer = io.BytesIO()
    table.write_parquet(buffer)
    table_location = f"gs://{dl_bucket}/{table_path}"
    pipes.log.info(f"writing {rows} rows to {table_location}")
    storage_client().bucket(dl_bucket).blob(table_path).upload_from_string(
        buffer.getvalue(), content_type="application/vnd.apache.parquet"
    )

    pipes.report_asset_materialization(
        metadata={
            "table_location": {"raw_value": table_location, "type": "url"},
            "row_count": {"raw_value": table.height, "type": "int"},
            "schema": {"raw_value": {name: str(dtype) for name, dtype in table.schema.items()}, "type": "json"},
            "total_amount": {"raw_value": round(float(table["amount"].sum()), 2), "type": "float"},
        }
    )
    pipes.log.info("done")


#: the same function behind an HTTP trigger, for invocation="http" (deploy with --trigger-http --entry-point main_http)
main_http = main.http
