"""``bench/handler.py``'s ``work`` as a Cloud Function entry point, for the Functions Framework; ``prints``
is the print-throughput function of ``bench/prints.py``."""

import time
from typing import Any

from bench.handler import work
from dagster_gcf_pipes.function.context import CloudFunctionPipesContext
from dagster_gcf_pipes.function.entrypoint import pipes_function

main = pipes_function(work)
main_http = main.http  # the earlier design's HTTP trigger


@pipes_function
def prints(pipes: CloudFunctionPipesContext, payload: dict[str, Any]) -> None:
    """Print ``print_lines`` numbered lines to stdout; report when the printing started (epoch seconds, for
    the end-to-end rate on this one machine) and how long it took."""
    started, clock = time.time(), time.perf_counter()
    for i in range(int(payload["print_lines"])):
        print(f"printed line {i}")
    pipes.report_asset_materialization(metadata={
        "print_started": {"raw_value": started, "type": "float"},
        "print_seconds": {"raw_value": time.perf_counter() - clock, "type": "float"},
    })
