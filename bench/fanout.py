"""Fan-out wall time on the local stack: N trivial shards vs. one, at a given concurrency.

    python -m bench.fanout [--shards 1 20 100] [--concurrency 20] [--profile PATH] [--results PATH]

Prints one table: shards, concurrency, wall time, ratio to one shard, the orchestrator's CPU per shard, peak
RSS and threads (``--results``: also as JSON, which ``bench.plots`` draws as docs/img/fan_out.png), then the
CPU a shard of each of the local stack's processes. Each step runs on a fresh stack. ``--profile``: the largest fan-out runs under py-spy (``bench/profile.py``), which writes its
samples to PATH, and the table of where its CPU went follows.
"""


import argparse
import json
import os
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

from dagster import AssetExecutionContext, DagsterInstance, PreviewWarning, asset, materialize

from bench.profile import breakdown, sampled
from bench.profile import table as profile_table
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient

TOPIC = "bench-trigger"


def current_rss_mb() -> float:
    """This process's resident set size now (Linux), unlike ru_maxrss, which keeps the peak of earlier runs."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def process_group_cpu_seconds(pgid: int) -> float:
    """User and system CPU seconds of every live process in the process group ``pgid`` (Linux): a server the
    local stack started, with its children (the emulator's JVM under its launcher)."""
    ticks = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _server_kind(name: str) -> str:
    """A server's name without its topic (``function-bench-trigger`` -> ``function``)."""
    return name.removesuffix(f"-{TOPIC}")


def fan_out_seconds(
    client: PipesPubSubClient, shards: int, concurrency: int, console_log_level: str = "DEBUG", on_disk: bool = False
) -> tuple[float, int, float]:
    """Wall time, peak thread count and peak RSS (MB) of one fan-out step of ``shards`` trivial shards; the run's
    console logger at ``console_log_level`` (Dagster's default: DEBUG, every event printed). The run's events are
    kept in memory (an ephemeral instance) unless ``on_disk`` (SQLite files, as a deployment keeps them in its
    database): in memory they are part of the process's RSS."""
    peak_threads = 0
    peak_rss_mb = 0.0

    @asset(name=f"bench_fan_out_{shards}")
    def bench_fan_out(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        return pipes_pubsub.run_many(
            context=context, payloads=[{"n": i} for i in range(shards)], max_concurrency=concurrency
        ).get_materialize_result()

    stop = threading.Event()

    def watch_threads() -> None:
        nonlocal peak_threads, peak_rss_mb
        while not stop.wait(0.05):
            peak_threads = max(peak_threads, threading.active_count())
            peak_rss_mb = max(peak_rss_mb, current_rss_mb())

    watcher = threading.Thread(target=watch_threads, daemon=True)
    watcher.start()
    with DagsterInstance.local_temp() if on_disk else DagsterInstance.ephemeral() as instance:
        started = time.monotonic()
        result = materialize([bench_fan_out], resources={"pipes_pubsub": client}, instance=instance,
                             run_config={"loggers": {"console": {"config": {"log_level": console_log_level}}}})
        elapsed = time.monotonic() - started
    stop.set()
    assert result.success
    return elapsed, peak_threads, peak_rss_mb


def main() -> None:
    warnings.filterwarnings("ignore", category=PreviewWarning)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 20, 100])
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--profile", type=Path, help="profile the largest fan-out with py-spy; raw samples to this file")
    parser.add_argument("--results", type=Path, help="write the rows as JSON here (bench.plots draws them)")
    parser.add_argument("--events-on-disk", action="store_true",
                        help="keep the run's events in SQLite files, not in this process's memory")
    parser.add_argument("--console-log-level", default="DEBUG",
                        help="the run's console logger level (Dagster's default DEBUG prints every event; WARNING: what a user can save)")
    args = parser.parse_args()
    function = LocalFunction("tests/functions/main.py", "main", TOPIC, env={"THREADS": str(max(8, args.concurrency * 2))})
    rows = []
    stack_cpu: dict[int, dict[str, float]] = {}
    for shards in args.shards:
        # a fresh stack for each step: fake-gcs-server's in-memory backend finds an object by scanning the
        # bucket, so the tombstones an earlier step left (kept for the start window) would slow this one down,
        # which Cloud Storage's lookups do not
        with LocalStack(functions=[function]) as stack, stack.activated():
            client = PipesPubSubClient(trigger_topic=TOPIC, reply_topic="pipes-replies", bucket="pipes-payloads")
            fan_out_seconds(client, 1, 1)  # warm up imports and the function instance
            servers = {name: server.process.pid for name, server in stack.servers.items() if server.process is not None}
            servers_before = {name: process_group_cpu_seconds(pid) for name, pid in servers.items()}
            profiling = args.profile is not None and shards == max(args.shards)
            with sampled(args.profile) if profiling else nullcontext():
                cpu = time.process_time()
                seconds, threads, rss_mb = fan_out_seconds(client, shards, min(args.concurrency, shards), args.console_log_level, args.events_on_disk)
                cpu_ms = 1000 * (time.process_time() - cpu) / shards
            stack_cpu[shards] = {
                _server_kind(name): 1000 * (process_group_cpu_seconds(pid) - servers_before[name]) / shards
                for name, pid in servers.items()
            }
        rows.append((shards, min(args.concurrency, shards), seconds, cpu_ms, threads, rss_mb))
    base = rows[0][2] if rows and rows[0][0] == 1 else None
    print("\n| shards | concurrency | wall s | × one shard | orchestrator CPU ms per shard | peak threads | peak RSS MB |"
          "\n|---:|---:|---:|---:|---:|---:|---:|")
    for shards, concurrency, seconds, cpu_ms, threads, rss_mb in rows:
        ratio = f"{seconds / base:.2f}" if base else "-"
        print(f"| {shards} | {concurrency} | {seconds:.2f} | {ratio} | {cpu_ms:.1f} | {threads} | {rss_mb:.0f} |")
    kinds = list(next(iter(stack_cpu.values()), {}))
    print("\nThe local stack's CPU, ms a shard, by process (they share the 2 cores with the orchestrator):\n")
    print("| shards | orchestrator | " + " | ".join(kinds) + " |\n|---:|---:|" + "---:|" * len(kinds))
    for shards, _, _, cpu_ms, _, _ in rows:
        print(f"| {shards} | {cpu_ms:.1f} | " + " | ".join(f"{stack_cpu[shards].get(k, 0.0):.1f}" for k in kinds) + " |")
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"cores": os.cpu_count(), "fan_out": [
            {"shards": shards, "concurrency": concurrency, "seconds": seconds, "cpu_seconds": cpu_ms * shards / 1000,
             "threads": threads, "rss_mb": rss_mb, "stack_cpu_ms_per_shard": stack_cpu[shards]}
            for shards, concurrency, seconds, cpu_ms, threads, rss_mb in rows]}, indent=1))
    if args.profile is not None:
        print(f"\nWhere the orchestrator's CPU went in the {rows[-1][0]:,}-shard step (py-spy samples in {args.profile}):\n")
        print(profile_table(breakdown(args.profile), rows[-1][3]))


if __name__ == "__main__":
    main()
