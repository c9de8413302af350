"""The cost and quota model of the reply channel ("Cost and quotas" in docs/architecture.md), from the
production-semantics layer's meter as ``python -m bench`` recorded it.

    python -m bench.cost_model [--results bench/results/bench.json] [--session-seconds 60]
    python -m bench.cost_model --batch-bytes B --heartbeat-bytes H [--session-seconds S]   your own figures
    python -m bench.cost_model --fan-out [--shard-seconds 60]   one step of 10,000 and 100,000 shards

The results JSON holds the meter's counts per session (``ours (Pub/Sub)``'s trivial sessions: the quiet
volume; its bulk session: the chatty one) and per 1,000 shards of a fan-out: admin operations, messages
and billable bytes published on the reply topic, messages and bytes delivered. Pricing ("Pub/Sub pricing" page): a message's
data volume is its data, each attribute's key and value, 20 bytes of timestamp and its message id; at least
1000 bytes are assessed per publish, push or pull request; throughput costs $40 per TiB. Filtering ("Filter
messages from a subscription" page): a message a subscription's filter drops is acknowledged by Pub/Sub, and
still billed as message delivery. Admin operations ("Pub/Sub quotas and limits" page) have a per-project
quota, 6,000 per minute by default.
"""

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.plots import results_dir

MIN_BILLED_PER_REQUEST = 1000  # bytes assessed per publish / push / pull request, whatever the message size
USD_PER_TIB = 40.0
ADMIN_OPS_PER_SECOND_QUOTA = 6000 / 60
SECONDS_PER_MONTH = 30 * 24 * 3600
CONCURRENCY = (10, 100, 1000)
#: the bench row whose meter counts the model reads
MEASURED_ROW = "ours (Pub/Sub)"
#: one heartbeat's billable bytes: the bench's sessions end before their first heartbeat, so this is the size
#: an earlier run measured on the reply topic (a heartbeat is a fixed set of attributes and no data)
HEARTBEAT_BYTES = 179.0


@dataclass(frozen=True)
class ReplyVolume:
    """What one session publishes: its batches (measured per session) and one heartbeat (measured)."""

    batches: float
    batch_bytes: float  # billable bytes of one session's batches, all together
    heartbeat_bytes: float  # billable bytes of one heartbeat

    def per_session(self, session_seconds: float, heartbeat_interval: float) -> tuple[float, float, float]:
        """(messages, billable bytes, bytes assessed when each message is its own request) of one session."""
        heartbeats = session_seconds / heartbeat_interval
        messages = self.batches + heartbeats
        volume = self.batch_bytes + heartbeats * self.heartbeat_bytes
        assessed = max(self.batch_bytes, self.batches * MIN_BILLED_PER_REQUEST) + heartbeats * max(
            self.heartbeat_bytes, MIN_BILLED_PER_REQUEST
        )
        return messages, volume, assessed


@dataclass(frozen=True)
class AdminOps:
    """Pub/Sub admin operations of one ``run()`` session and of one ``run_many`` step (its group subscription)."""

    per_session: float = 2.0
    per_group: float = 2.0


@dataclass(frozen=True)
class Measured:
    """What the model reads from a bench run: reply volumes by name, admin operations, and what to print of
    the meter's other counts."""

    volumes: Mapping[str, ReplyVolume]
    admin: AdminOps = field(default_factory=AdminOps)
    notes: str = ""


@dataclass(frozen=True)
class Row:
    topology: str
    concurrent_sessions: int
    subscriptions_on_topic: int
    admin_ops_per_second: float
    published_bytes_per_second: float
    delivered_bytes_per_second: float  # billed, including what filters drop

    @property
    def usd_per_month(self) -> float:
        billed = self.published_bytes_per_second + self.delivered_bytes_per_second
        return billed * SECONDS_PER_MONTH / 2**40 * USD_PER_TIB


def model(
    volume: ReplyVolume,
    *,
    session_seconds: float = 60.0,
    heartbeat_interval: float = 10.0,
    group_size: int = 100,
    reply_topics: int = 10,
    concurrency: Sequence[int] = CONCURRENCY,
    admin: AdminOps = AdminOps(),
) -> list[Row]:
    """Steady state with ``n`` sessions always running, each ``session_seconds`` long: ``n / session_seconds``
    sessions start every second. Every reply is delivered (and billed) once per subscription on the reply
    topic; its own subscription's delivery is assessed per request, the others' (dropped by their filter) at
    the message's size. Three topologies: a subscription per session (``run``) on one reply topic; the same
    spread over ``reply_topics`` topics (``reply_topics=[...]``: a reply meets only the subscriptions on its
    own topic); and one subscription per fan-out group of ``group_size`` shards (``run_many``, ``ReplyDemux``)."""
    _, volume_bytes, assessed = volume.per_session(session_seconds, heartbeat_interval)
    rows = []
    for n in concurrency:
        starts_per_second = n / session_seconds
        published = starts_per_second * assessed
        groups = math.ceil(n / group_size)
        for topology, subscriptions, admin_per_session in (
            ("subscription per session", n, admin.per_session),
            (f"subscription per session, {reply_topics} reply topics", math.ceil(n / reply_topics), admin.per_session),
            (f"subscription per fan-out group of {group_size}", groups, admin.per_group * groups / n),
        ):
            filtered_out = starts_per_second * volume_bytes * (subscriptions - 1)
            rows.append(
                Row(
                    topology=topology,
                    concurrent_sessions=n,
                    subscriptions_on_topic=subscriptions,
                    admin_ops_per_second=admin_per_session * starts_per_second,
                    published_bytes_per_second=published,
                    delivered_bytes_per_second=published + filtered_out,
                )
            )
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| topology | concurrent sessions | subscriptions on the reply topic | admin ops/s (quota 100/s) | "
        "published KB/s | delivery billed KB/s | × published | USD/month |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.topology} | {row.concurrent_sessions:,} | {row.subscriptions_on_topic:,} | "
            f"{row.admin_ops_per_second:.2f} | {row.published_bytes_per_second / 1e3:,.1f} | "
            f"{row.delivered_bytes_per_second / 1e3:,.1f} | "
            f"{row.delivered_bytes_per_second / row.published_bytes_per_second:,.1f} | {row.usd_per_month:,.2f} |"
        )
    return "\n".join(lines)


def from_results(path: Path) -> Measured:
    """The model's inputs from a results JSON ``python -m bench`` wrote (a clear error if it has no meter)."""
    try:
        results: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path} not found: run `python -m bench` (or `--quick`) first, or pass --results") from None
    row = results.get("meter", {}).get(MEASURED_ROW)
    if not row or not row.get("trivial"):
        raise SystemExit(f"{path} has no meter counts for {MEASURED_ROW!r}: it predates the production-semantics "
                         "layer's meter or ran without it; run `python -m bench` again")
    volumes = {}
    for kind, label in (("trivial", "quiet (a trivial session)"), ("bulk", "chatty (the bulk session)")):
        published = row[kind]["reply_topic"]
        volumes[label] = ReplyVolume(published["messages_published"], published["bytes_published"], HEARTBEAT_BYTES)
    fan = max(results["fan_out"], key=lambda r: r["shards"])
    per_1000 = fan["meter_per_1000_shards"]
    per_step = per_1000["admin_ops_total"] * fan["shards"] / 1000
    trivial = row["trivial"]
    notes = (
        f"measured ({path}): a session makes {trivial['admin_ops_total']:g} admin operations "
        f"({', '.join(f'{m} {c:g}' for m, c in trivial['admin_ops'].items())}); its own subscription is delivered "
        f"{trivial['replies']['messages_delivered']:g} messages, {trivial['replies']['bytes_delivered']:,.0f} B; "
        f"a fan-out step of {fan['shards']} shards makes {per_step:g}, and per shard its group subscription is "
        f"delivered {per_1000['replies']['messages_delivered'] / 1000:g} messages, "
        f"{per_1000['replies']['bytes_delivered'] / 1000:,.0f} B\n"
    )
    return Measured(volumes, AdminOps(per_session=trivial["admin_ops_total"], per_group=per_step), notes)


def report(
    measured: Measured,
    *,
    session_seconds: float = 60.0,
    heartbeat_interval: float = 10.0,
    group_size: int = 100,
    reply_topics: int = 10,
) -> str:
    """The model's tables, one per reply volume (``python -m bench`` prints ``report(from_results(...))``)."""
    parts = [measured.notes]
    for name, volume in measured.volumes.items():
        messages, size, _ = volume.per_session(session_seconds, heartbeat_interval)
        parts.append(
            f"\n{name}: {volume.batches:.1f} batches ({volume.batch_bytes:,.0f} B) + one heartbeat per "
            f"{heartbeat_interval:g} s ({volume.heartbeat_bytes:,.0f} B each) = {messages:.0f} messages, "
            f"{size:,.0f} B per {session_seconds:g} s session\n"
        )
        rows = model(
            volume, session_seconds=session_seconds, heartbeat_interval=heartbeat_interval, group_size=group_size,
            reply_topics=reply_topics, admin=measured.admin,
        )
        parts.append(table(rows))
    return "\n".join(parts)


#: Cloud Run functions' default maximum instances (gen2), and a raised one; each instance takes one request at a
#: time unless deployed with --concurrency (THREADED_TIMEOUT_ENABLED, docs/deploy.md): run_many's ceiling
CAPACITIES = (100, 1000)
FAN_OUT_SHARDS = (10_000, 100_000)
#: Cloud Storage class A operations (object writes) per 10,000, standard storage
USD_PER_10K_CLASS_A = 0.05
#: a shard's lease writes (class A), both the function's: its claim, and the tombstone it writes as it closes
#: (the orchestrator writes it only for a session that did not close; it reads the lease only for an
#: `opened` without the trigger's owner token)
LEASE_WRITES_PER_SHARD = 2


def fan_out_scale(bench: Path, fan_out: Path | None, shard_seconds: float) -> str:
    """One ``run_many`` step of 10,000 and 100,000 shards on real GCP, from what the bench measured per shard
    (the meter's per-1,000-shard counts in ``bench``; the orchestrator's CPU a shard in ``fan_out``, the fan-out
    bench's JSON): how long at Cloud Run's capacity, what Pub/Sub and GCS bill, what the orchestrator spends."""
    results = json.loads(bench.read_text())
    fan = max(results["fan_out"], key=lambda r: r["shards"])
    per_1000 = fan.get("meter_per_1000_shards")
    if not per_1000:
        raise SystemExit(f"{bench} has no meter counts of its fan-outs (it predates the production-semantics layer's "
                         "meter): run `python -m bench`, or pass --results bench/results/quick/bench.json")
    delivered_messages = per_1000["replies"]["messages_delivered"] / 1000
    delivered_bytes = per_1000["replies"]["bytes_delivered"] / 1000
    largest = max(json.loads(fan_out.read_text())["fan_out"], key=lambda r: r["shards"]) if fan_out else fan
    cpu_ms = 1000 * largest["cpu_seconds"] / largest["shards"]
    # each trigger publish and push, and each reply publish, is its own request (>= 1000 B assessed); deliveries
    # on the group's stream are billed at their size
    billed_per_shard = (2 + delivered_messages) * MIN_BILLED_PER_REQUEST + delivered_bytes
    lines = [
        f"A fan-out step on real GCP, from the bench's per-shard figures: {delivered_messages:.1f} replies "
        f"({delivered_bytes:,.0f} B) delivered per shard on the group's one subscription, {cpu_ms:.1f} ms of "
        f"orchestrator CPU per shard (a {largest['shards']:,}-shard step), shards of {shard_seconds:g} s:\n",
        "| shards | capacity (instances x concurrency) | wall time | admin ops (quota 6,000/min) | trigger + reply "
        "messages | Pub/Sub USD | GCS writes (USD) | orchestrator CPU | Dagster events (about) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shards in FAN_OUT_SHARDS:
        for capacity in CAPACITIES:
            wall = math.ceil(shards / capacity) * shard_seconds
            writes = shards * LEASE_WRITES_PER_SHARD
            lines.append(
                f"| {shards:,} | {capacity:,} | {wall / 60:,.0f} min | 2 | {shards * (1 + delivered_messages):,.0f} | "
                f"{shards * billed_per_shard / 2**40 * USD_PER_TIB:.4f} | {writes:,} ({writes / 1e4 * USD_PER_10K_CLASS_A:.2f}) | "
                f"{shards * cpu_ms / 1000 / 60:,.1f} min of one core | {shards + shards // 10:,} |"
            )
    lines.append(
        "\nThe step makes 2 admin operations whatever its size (one group subscription), so the quota is no limit; "
        "what bounds it is Cloud Run's capacity (run_many lowers max_concurrency to it when function_name is set) and "
        "the orchestrator's CPU, one core for the whole step. Threads stay at max_concurrency plus the stream's, "
        "whatever the number of shards. Dagster writes about one event a shard for each log line the function sends, "
        "and the session records gathered (the shards that start together share one event: 10 to 20 at the bench's "
        "pace, up to 100), into the run's event log (Postgres in production)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--session-seconds", type=float, default=60.0, help="how long a session runs (default 60)")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0, help="the client's heartbeat_interval")
    parser.add_argument("--group-size", type=int, default=100, help="shards per fan-out step")
    parser.add_argument("--reply-topics", type=int, default=10, help="topics in reply_topics=[...]")
    parser.add_argument("--results", type=Path, help="the bench's results JSON (default bench/results/bench.json)")
    parser.add_argument("--batch-bytes", type=float, help="billable bytes of one session's batches (skip measuring)")
    parser.add_argument("--batches", type=float, default=1.0, help="with --batch-bytes: batches per session")
    parser.add_argument("--heartbeat-bytes", type=float, default=HEARTBEAT_BYTES, help="with --batch-bytes: one heartbeat's bytes")
    parser.add_argument("--fan-out", action="store_true", help="model one step of 10,000 and 100,000 shards")
    parser.add_argument("--shard-seconds", type=float, default=60.0, help="with --fan-out: how long a shard runs")
    args = parser.parse_args()

    if args.fan_out:
        folder = results_dir(quick=False)
        fan_out = folder / "fan_out.json"
        print(fan_out_scale(args.results or folder / "bench.json", fan_out if fan_out.exists() else None, args.shard_seconds))
        return

    if args.batch_bytes is not None:
        measured = Measured({"given": ReplyVolume(args.batches, args.batch_bytes, args.heartbeat_bytes)})
    else:
        measured = from_results(args.results or results_dir(quick=False) / "bench.json")
    print(
        report(
            measured, session_seconds=args.session_seconds, heartbeat_interval=args.heartbeat_interval,
            group_size=args.group_size, reply_topics=args.reply_topics,
        )
    )


if __name__ == "__main__":
    main()
