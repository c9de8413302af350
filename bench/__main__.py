"""One command, one table: our Pub/Sub path against the local floor and the raw transport, on the local stack.

    python -m bench [--quick]      (make bench)

Rows: (a) ours, Pub/Sub trigger + Pub/Sub replies, the function in the Functions Framework fed by a push
subscription, three times: through the local stack's production-semantics layer at the emulator's latency,
through it with 100 ms added per hop (production's "on the order of 100 ms"), and on the bare emulator
(a second stack, ``production_semantics=False``), and once with the same handler in Node.js (``bench/node_handler``,
through ``@dagster-gcf-pipes/function`` and Google's Node.js Functions Framework) through the layer; (b) the earlier design, the same function invoked over HTTP with its replies as GCS chunks,
at dagster-pipes' default interval (10 s) and at 1 s; (c) the floor, ``PipesSubprocessClient`` running the same handler as a local process;
(d) the raw emulator publish -> streaming-pull receive round trip, on the bare emulator. Times come from the
timestamps Dagster recorded in its event log, so they are what Dagster handled, not what was sent. Through the layer, its meter
is reset before each measured run and read after it: the Pub/Sub calls, admin operations, deliveries and
publishes per session (``bench/meter.py``) and per 1,000 shards of a fan-out.

The raw samples go to ``--results`` (JSON; by default ``bench/results/bench.json``, ``bench/results/quick/``
under ``--quick``), which ``python -m bench.plots`` draws and ``python -m bench.cost_model`` reads.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    DagsterEventType,
    DagsterInstance,
    PipesSubprocessClient,
    PreviewWarning,
    asset,
    materialize,
)
from google.cloud import pubsub_v1

from bench.fanout import fan_out_seconds
from bench.meter import figures, metered, table
from bench.plots import results_dir
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient

REPO_ROOT = Path(__file__).resolve().parent.parent

TOPIC = "bench-trigger"
NODE_TOPIC = "bench-node-trigger"
RAW_TOPIC = "bench-raw"
REPLY_TOPIC = "pipes-replies"
OURS = "ours (Pub/Sub)"
OURS_LATENCY = "ours, 100 ms per hop"
OURS_BARE = "ours, bare emulator"
OURS_NODE = "ours, Node.js function"
#: production's per-hop delivery latency ("on the order of 100 ms", Pub/Sub's overview), added by the layer
PRODUCTION_LATENCY_MS = 100
EARLIER_DEFAULT = "earlier design (HTTP + GCS chunks, 10 s)"
EARLIER_1S = "earlier design (HTTP + GCS chunks, 1 s)"
FLOOR = "floor (subprocess)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_once(resources: dict[str, Any], call: Callable[[AssetExecutionContext, Any], Any]) -> dict[str, Any]:
    """Materialize one asset; return the event-log timings and the user log lines Dagster recorded."""

    @asset(name="bench_asset", required_resource_keys={"client"})
    def bench_asset(context: AssetExecutionContext):
        return call(context, context.resources.client)

    with DagsterInstance.ephemeral() as instance:
        result = materialize([bench_asset], resources=resources, instance=instance)
        assert result.success
        entries = instance.all_logs(result.run_id)
    stamp = {e.dagster_event.event_type: e.timestamp for e in entries if e.dagster_event is not None}
    user = [e for e in entries if e.dagster_event is None]
    first = next(e.timestamp for e in user if e.user_message == "first line")
    lines = [e for e in user if e.user_message.startswith("line ")]
    return {
        "first_log": first - stamp[DagsterEventType.STEP_START],
        "step": stamp[DagsterEventType.STEP_SUCCESS] - stamp[DagsterEventType.STEP_START],
        "lines": len(lines),
        "lines_seconds": (lines[-1].timestamp - first) if lines else 0.0,
    }


def ours(client: PipesPubSubClient) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda payload: run_once(
        {"client": client}, lambda context, c: c.run(context=context, payload=payload).get_materialize_result()
    )


def floor() -> Callable[[dict[str, Any]], dict[str, Any]]:
    client = PipesSubprocessClient(env={"PYTHONPATH": str(REPO_ROOT)})
    command = [sys.executable, str(REPO_ROOT / "bench" / "handler.py")]
    return lambda payload: run_once(
        {"client": client},
        lambda context, c: c.run(context=context, command=command, extras={"payload": payload}).get_materialize_result(),
    )


def raw_round_trips(project: str, count: int) -> list[float]:
    """Publish -> streaming-pull receive on the emulator, one message at a time."""
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.create_topic(request={"name": publisher.topic_path(project, RAW_TOPIC)}).name
    subscriber = pubsub_v1.SubscriberClient()
    subscription = subscriber.create_subscription(
        request={"name": subscriber.subscription_path(project, RAW_TOPIC), "topic": topic}
    ).name
    received = threading.Event()

    def on_message(message: Any) -> None:
        message.ack()
        received.set()

    future = subscriber.subscribe(subscription, on_message)
    times = []
    for _ in range(count):
        received.clear()
        started = time.monotonic()
        publisher.publish(topic, b"x").result()
        received.wait(10)
        times.append(time.monotonic() - started)
    future.cancel()
    subscriber.close()
    return times


def meter_figures(stack: LocalStack, reading: Any, units: float) -> dict[str, Any] | None:
    return figures(reading.meter, units, trigger_subscription=stack.trigger_subscription(TOPIC), reply_topic=REPLY_TOPIC)


def fan_out_with_cpu(stack: LocalStack, client: PipesPubSubClient, shards: int) -> dict[str, Any]:
    """``fan_out_seconds`` plus the CPU seconds this (the orchestrator's) process spent on it and the meter's
    counts per 1,000 shards."""
    cpu = time.process_time()
    with metered(stack) as reading:
        seconds, threads, rss_mb = fan_out_seconds(client, shards, min(shards, 100))
    return {
        "shards": shards, "seconds": seconds, "threads": threads, "rss_mb": rss_mb, "cpu_seconds": time.process_time() - cpu,
        "meter_per_1000_shards": meter_figures(stack, reading, shards / 1000),
    }


def measure_row(
    stack: LocalStack, run: Callable[[dict[str, Any]], dict[str, Any]], sessions: int, log_lines: int, payload_sizes: list[int]
) -> dict[str, Any]:
    """One row: ``sessions`` trivial sessions and one bulk one, each metered, then one per payload size."""
    run({})  # warm up
    with metered(stack) as trivial_reading:
        trivial = [run({}) for _ in range(sessions)]
    with metered(stack) as bulk_reading:
        bulk = run({"log_lines": log_lines})
    sized = {}
    for size in payload_sizes:
        outcome = run({"metadata_bytes": size})
        sized[size] = (outcome["step"], peak_rss_mb())
    meter = {"trivial": meter_figures(stack, trivial_reading, sessions), "bulk": meter_figures(stack, bulk_reading, 1)}
    return {"trivial": trivial, "bulk": bulk, "sized": sized, "meter": meter}


def write_results(path: Path, rows: dict[str, dict[str, Any]], raw: list[float], fan: list[dict[str, Any]]) -> None:
    """The raw samples behind the tables, for ``bench/plots.py``; the meter's counts, for ``bench/cost_model.py``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "cores": os.cpu_count(),
        "first_log": {name: [t["first_log"] for t in row["trivial"]] for name, row in rows.items()},
        "step": {name: [t["step"] for t in row["trivial"]] for name, row in rows.items()},
        "meter": {name: row["meter"] for name, row in rows.items()},
        "raw_round_trip": raw,
        "fan_out": fan,
    }, indent=1))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    warnings.filterwarnings("ignore", category=PreviewWarning)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sessions and smaller loads (< 2 minutes)")
    parser.add_argument("--results", type=Path, help="where the raw samples go (JSON; default bench/results/bench.json)")
    args = parser.parse_args()
    sessions = 5 if args.quick else 20
    log_lines = 2_000 if args.quick else 20_000
    payload_sizes = [1_000, 1_000_000] if args.quick else [1_000, 1_000_000, 20_000_000]
    fan_outs = [1, 10] if args.quick else [1, 10, 100, 1000]

    started = time.monotonic()
    functions = [
        LocalFunction("bench/cloud_handler.py", "main", TOPIC, env={"THREADS": "64"}),
        LocalFunction("bench/cloud_handler.py", "main_http", env={"THREADS": "64"}),
        LocalFunction("bench/node_handler/index.js", "main", NODE_TOPIC),
    ]
    with LocalStack(functions=functions, production_semantics=True) as stack, stack.activated():
        client = PipesPubSubClient(trigger_topic=TOPIC, reply_topic=REPLY_TOPIC, bucket="pipes-payloads")
        earlier = {
            "invocation": "http", "function_url": stack.function_urls["main_http"], "http_auth": "none",
            "reply_channel": "gcs", "bucket": "pipes-payloads",
        }
        runners = {
            OURS: ours(client),
            OURS_NODE: ours(PipesPubSubClient(trigger_topic=NODE_TOPIC, reply_topic=REPLY_TOPIC, bucket="pipes-payloads")),
            EARLIER_DEFAULT: ours(PipesPubSubClient(**earlier, chunk_interval=10.0)),
            EARLIER_1S: ours(PipesPubSubClient(**earlier, chunk_interval=1.0)),
            FLOOR: floor(),
        }
        rows = {name: measure_row(stack, run, sessions, log_lines, payload_sizes) for name, run in runners.items()}
        with stack.semantics.behaving(delivery_latency_ms=PRODUCTION_LATENCY_MS):
            rows[OURS_LATENCY] = measure_row(stack, ours(client), sessions, log_lines, payload_sizes)
        fan = [fan_out_with_cpu(stack, client, n) for n in fan_outs]
    with LocalStack(functions=functions[:1], production_semantics=False) as bare, bare.activated():
        client = PipesPubSubClient(trigger_topic=TOPIC, reply_topic=REPLY_TOPIC, bucket="pipes-payloads")
        rows[OURS_BARE] = measure_row(bare, ours(client), sessions, log_lines, payload_sizes)
        raw = raw_round_trips(bare.project, sessions)  # the emulator's own round trip: the transport's floor

    print(f"\nlocal stack, {os.cpu_count()} cores, {sessions} sessions per figure, {log_lines} log lines for throughput")
    print("\n| path | first log median / p95 s | step median / p95 s | logs/s handled (received/sent) |"
          + "".join(f" {s / 1e6:g} MB metadata: s, peak RSS MB |" for s in payload_sizes))
    print("|---|---|---|---|" + "---|" * len(payload_sizes))
    for name, row in rows.items():
        first = [t["first_log"] for t in row["trivial"]]
        step = [t["step"] for t in row["trivial"]]
        bulk = row["bulk"]
        rate = bulk["lines"] / bulk["lines_seconds"] if bulk["lines_seconds"] else float("nan")
        sized = "".join(f" {s:.2f}, {rss:.0f} |" for s, rss in row["sized"].values())
        print(f"| {name} | {statistics.median(first):.3f} / {percentile(first, 0.95):.3f} | "
              f"{statistics.median(step):.3f} / {percentile(step, 0.95):.3f} | {rate:,.0f} ({bulk['lines']}/{log_lines}) |{sized}")
    print(f"| raw emulator round trip | {statistics.median(raw):.3f} / {percentile(raw, 0.95):.3f} | | | " + "| " * len(payload_sizes))

    step_median = {k: statistics.median(t["step"] for t in r["trivial"]) for k, r in rows.items()}
    first_median = {k: statistics.median(t["first_log"] for t in r["trivial"]) for k, r in rows.items()}
    print("\n| ratio | value |\n|---|---|")
    print(f"| ours first log / raw round trip | {first_median[OURS] / statistics.median(raw):.1f}× |")
    print(f"| ours step − floor step | {step_median[OURS] - step_median[FLOOR]:+.3f} s |")
    print(f"| ours step / floor step | {step_median[OURS] / step_median[FLOOR]:.2f}× |")
    for other in (OURS_LATENCY, OURS_BARE):
        print(f"| {other}: first log / ours, step / ours | {first_median[other] / first_median[OURS]:.2f}×, {step_median[other] / step_median[OURS]:.2f}× |")
    for earlier in (EARLIER_DEFAULT, EARLIER_1S):
        print(f"| {earlier}: first log / ours, step / ours | {first_median[earlier] / first_median[OURS]:.1f}×, {step_median[earlier] / step_median[OURS]:.1f}× |")

    print("\n| fan-out shards | wall s | × one shard | orchestrator CPU s | CPU ms per shard | peak threads | peak RSS MB |"
          "\n|---:|---:|---:|---:|---:|---:|---:|")
    for row in fan:
        print(f"| {row['shards']} | {row['seconds']:.2f} | {row['seconds'] / fan[0]['seconds']:.2f} | {row['cpu_seconds']:.2f} | "
              f"{1000 * row['cpu_seconds'] / row['shards']:.1f} | {row['threads']} | {row['rss_mb']:.0f} |")

    print("\nThe production-semantics layer's meter, per session (trivial sessions; one bulk session of "
          f"{log_lines:,} log lines), from a reset before the run to a reading after it:\n")
    print(table({f"{name}, {kind}": row["meter"][kind] for name, row in rows.items() for kind in ("trivial", "bulk")}, "per session"))
    print("\nPer 1,000 shards of a fan-out (`run_many`, at most 100 at once):\n")
    print(table({f"{row['shards']} shards": row["meter_per_1000_shards"] for row in fan}, "per 1,000 shards"))
    results = args.results or results_dir(args.quick) / "bench.json"
    write_results(results, rows, raw, fan)
    print(f"\nraw samples in {results}; bench took {time.monotonic() - started:.0f}s")
    from bench.cost_model import from_results, report

    print("\n" + report(from_results(results)))


if __name__ == "__main__":
    main()
