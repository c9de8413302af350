"""Printed lines per second from one function into its Dagster step's stdout, on the local stack.

    python -m bench.prints [--lines 100000] [--runs 2]

The function (``bench/cloud_handler.py``'s ``prints``) prints numbered lines; they travel as Pipes
``log_external_stream`` messages and Dagster writes them to the step's ``sys.stdout``, which this process
counts during the run (in place of the compute log file ``dagster dev`` would write). The rate is the lines
received over the time from the function's first print to the last line's arrival in the step's stdout
(one machine, one clock), so it counts the transport's tail too; received/sent shows whether any was lost,
and "in order, once" whether each came exactly once and in order.
"""

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dagster import AssetExecutionContext, DagsterInstance, PreviewWarning, asset, materialize

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient

TOPIC = "bench-prints-trigger"
FUNCTION = LocalFunction("bench/cloud_handler.py", "prints", TOPIC)
HEADER = ("| path | printed lines/s into the step's stdout, median (min) | received/sent | in order, once "
          "| function prints/s |")


@dataclass
class LineCounter:
    """A stand-in for the step's stdout: keeps the printed lines' numbers and when the last one came."""

    numbers: list[int] = field(default_factory=list)
    last_at: float = 0.0
    _partial: str = ""

    def write(self, text: str) -> int:
        *complete, self._partial = (self._partial + text).split("\n")
        numbers = [int(line.rsplit(" ", 1)[1]) for line in complete if line.startswith("printed line ")]
        if numbers:
            self.last_at = time.time()
            self.numbers.extend(numbers)
        return len(text)

    def flush(self) -> None:
        pass


@contextmanager
def counting_stdout() -> Iterator[LineCounter]:
    counter = LineCounter()
    saved, sys.stdout = sys.stdout, counter
    try:
        yield counter
    finally:
        sys.stdout = saved


def run_once(client: PipesPubSubClient, lines: int) -> tuple[float, int, bool, float]:
    """(lines/s into the step's stdout, lines received, all in order exactly once, the function's print s)."""

    @asset(name="bench_prints")
    def bench_prints(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        return pipes_pubsub.run(context=context, payload={"print_lines": lines}).get_materialize_result()

    with DagsterInstance.ephemeral() as instance, counting_stdout() as counter:
        result = materialize([bench_prints], resources={"pipes_pubsub": client}, instance=instance)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    rate = len(counter.numbers) / (counter.last_at - metadata["print_started"])
    return rate, len(counter.numbers), counter.numbers == list(range(lines)), metadata["print_seconds"]


def measure(client: PipesPubSubClient, lines: int, runs: int) -> str:
    """The table row: ``runs`` runs of ``lines`` printed lines (after a warm-up) through ``client``, whose
    trigger topic feeds ``FUNCTION``."""
    run_once(client, 100)  # warm up
    results = [run_once(client, lines) for _ in range(runs)]
    rates = [rate for rate, *_ in results]
    received = min(count for _, count, *_ in results)
    intact = all(ok for _, _, ok, _ in results)
    printed = statistics.median(lines / seconds for *_, seconds in results)
    return (f"| ours (Pub/Sub) | {statistics.median(rates):,.0f} ({min(rates):,.0f}) | {received}/{lines} | "
            f"{'yes' if intact else 'NO'} | {printed:,.0f} |")


def main() -> None:
    warnings.filterwarnings("ignore", category=PreviewWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000, help="lines printed per run")
    parser.add_argument("--runs", type=int, default=2, help="measured runs (after one warm-up)")
    args = parser.parse_args()

    with LocalStack(functions=[FUNCTION]) as stack, stack.activated():
        client = PipesPubSubClient(trigger_topic=TOPIC, reply_topic="pipes-replies", bucket="pipes-payloads")
        row = measure(client, args.lines, args.runs)
    print(f"\nlocal stack, {os.cpu_count()} cores, {args.runs} runs of {args.lines} printed lines")
    print(f"\n{HEADER}\n|---|---|---|---|---|\n{row}")


if __name__ == "__main__":
    main()
