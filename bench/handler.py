"""The benchmarked business function, run as a local subprocess through ``PipesSubprocessClient``
(``python bench/handler.py``: the floor); ``bench/cloud_handler.py`` serves the same ``work`` in the
Functions Framework. Only dagster-pipes is imported here, so the floor pays no import it does not need."""

from typing import Any

from dagster_pipes import PipesContext, open_dagster_pipes


def work(pipes: PipesContext, payload: dict[str, Any]) -> None:
    pipes.log.info("first line")
    for i in range(int(payload.get("log_lines", 0))):
        pipes.log.info(f"line {i}")
    metadata_bytes = int(payload.get("metadata_bytes", 0))
    pipes.report_asset_materialization(metadata={"blob": {"raw_value": "m" * metadata_bytes, "type": "text"}})


if __name__ == "__main__":
    with open_dagster_pipes() as pipes:
        work(pipes, dict(pipes.extras.get("payload", {})))
