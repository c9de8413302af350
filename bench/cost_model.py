"""The cost and quota model of the reply channel ("Cost and quotas" in docs/architecture.md), from measured
reply volumes.

    python -m bench.cost_model [--session-seconds 60]     measure sessions on the local stack, print the model
    python -m bench.cost_model --batch-bytes B --heartbeat-bytes H [--session-seconds S]   your own figures

Replies are measured with an unfiltered "meter" subscription on the reply topic, which receives every reply
any session publishes; each is counted at its billable size. Pricing ("Pub/Sub pricing" page): a message's
data volume is its data, each attribute's key and value, 20 bytes of timestamp and its message id; at least
1000 bytes are assessed per publish, push or pull request; throughput costs $40 per TiB. Filtering ("Filter
messages from a subscription" page): a message a subscription's filter drops is acknowledged by Pub/Sub, and
still billed as message delivery. Admin operations ("Pub/Sub quotas and limits" page) have a per-project
quota, 6,000 per minute by default.
"""

import argparse
import math
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from dagster import AssetExecutionContext, DagsterInstance, PreviewWarning, asset, materialize
from google.cloud import pubsub_v1

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.session.pull import ack, pull
from dagster_gcf_pipes.shared.protocol import Attr, ReplyKind

MIN_BILLED_PER_REQUEST = 1000  # bytes assessed per publish / push / pull request, whatever the message size
TIMESTAMP_BYTES = 20
USD_PER_TIB = 40.0
ADMIN_OPS_PER_SECOND_QUOTA = 6000 / 60
SECONDS_PER_MONTH = 30 * 24 * 3600
#: Pub/Sub admin operations of one `run()` with this project's per-process topic-check cache: create and
#: delete the session's subscription (the two GetTopic checks are made once per process).
ADMIN_OPS_PER_SESSION = 2
CONCURRENCY = (10, 100, 1000)
TOPIC = "cost-trigger"
REPLY_TOPIC = "pipes-replies"


def billable_bytes(data: bytes, attributes: Mapping[str, str], message_id: str) -> int:
    """A message's data volume as the Pub/Sub pricing page defines it."""
    return len(data) + sum(len(k.encode()) + len(v.encode()) for k, v in attributes.items()) + TIMESTAMP_BYTES + len(
        message_id.encode()
    )


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
        for topology, subscriptions, created_per_session in (
            ("subscription per session", n, 1.0),
            (f"subscription per session, {reply_topics} reply topics", math.ceil(n / reply_topics), 1.0),
            (f"subscription per fan-out group of {group_size}", groups, groups / n),
        ):
            filtered_out = starts_per_second * volume_bytes * (subscriptions - 1)
            rows.append(
                Row(
                    topology=topology,
                    concurrent_sessions=n,
                    subscriptions_on_topic=subscriptions,
                    admin_ops_per_second=ADMIN_OPS_PER_SESSION * starts_per_second * created_per_session,
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


@contextmanager
def reply_meter(project: str, reply_topic: str) -> Iterator[tuple[pubsub_v1.SubscriberClient, str]]:
    """An unfiltered subscription on the reply topic for the block: it receives every reply."""
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(project, f"cost-meter-{secrets.token_hex(4)}")
    subscriber.create_subscription(request={"name": path, "topic": f"projects/{project}/topics/{reply_topic}"})
    try:
        yield subscriber, path
    finally:
        subscriber.delete_subscription(request={"subscription": path})
        subscriber.close()


def drain(subscriber: pubsub_v1.SubscriberClient, path: str) -> dict[str, tuple[int, int]]:
    """(messages, billable bytes) by reply kind, of everything waiting on the meter subscription."""
    totals: dict[str, tuple[int, int]] = {}
    while received := pull(subscriber, path, max_messages=1000, timeout=2.0):
        for r in received:
            kind = r.message.attributes.get(Attr.KIND, "?")
            count, size = totals.get(kind, (0, 0))
            totals[kind] = (count + 1, size + billable_bytes(r.message.data, r.message.attributes, r.message.message_id))
        ack(subscriber, path, [r.ack_id for r in received])
    return totals


def measure(client: PipesPubSubClient, project: str, payload: Mapping[str, object], sessions: int) -> ReplyVolume:
    """Run ``sessions`` sessions of ``payload`` and measure what they published on the reply topic."""

    @asset(name="cost_model_asset")
    def cost_model_asset(context: AssetExecutionContext, pipes_pubsub: PipesPubSubClient):
        return pipes_pubsub.run(context=context, payload=dict(payload)).get_materialize_result()

    with reply_meter(project, REPLY_TOPIC) as (subscriber, path):
        for _ in range(sessions):
            with DagsterInstance.ephemeral() as instance:
                assert materialize([cost_model_asset], resources={"pipes_pubsub": client}, instance=instance).success
        time.sleep(1.0)  # the last replies reach the meter
        totals = drain(subscriber, path)
    batches, batch_bytes = totals.get(ReplyKind.BATCH, (0, 0))
    heartbeats, heartbeat_bytes = totals.get(ReplyKind.HEARTBEAT, (0, 0))
    return ReplyVolume(batches / sessions, batch_bytes / sessions, heartbeat_bytes / heartbeats if heartbeats else 0.0)


def measured_volumes(sessions: int) -> dict[str, ReplyVolume]:
    """A quiet session (5 log lines) and a chatty one (2,000), each sleeping past two heartbeats."""
    function = LocalFunction("tests/functions/main.py", "main", TOPIC)
    with LocalStack(functions=[function]) as stack, stack.activated():
        client = PipesPubSubClient(
            trigger_topic=TOPIC, reply_topic=REPLY_TOPIC, bucket="pipes-payloads", heartbeat_interval=1.0, heartbeat_timeout=10.0
        )
        return {
            f"{lines:,} log lines": measure(client, stack.project, {"log_lines": lines, "sleep": 2.5}, sessions)
            for lines in (5, 2000)
        }


def report(
    volumes: Mapping[str, ReplyVolume],
    *,
    session_seconds: float = 60.0,
    heartbeat_interval: float = 10.0,
    group_size: int = 100,
    reply_topics: int = 10,
) -> str:
    """The model's tables, one per reply volume (``python -m bench`` can print ``report(measured_volumes(3))``)."""
    parts = []
    for name, volume in volumes.items():
        messages, size, _ = volume.per_session(session_seconds, heartbeat_interval)
        parts.append(
            f"\n{name}: {volume.batches:.1f} batches ({volume.batch_bytes:,.0f} B) + one heartbeat per "
            f"{heartbeat_interval:g} s ({volume.heartbeat_bytes:,.0f} B each) = {messages:.0f} messages, "
            f"{size:,.0f} B per {session_seconds:g} s session\n"
        )
        rows = model(
            volume, session_seconds=session_seconds, heartbeat_interval=heartbeat_interval, group_size=group_size,
            reply_topics=reply_topics,
        )
        parts.append(table(rows))
    return "\n".join(parts)


def main() -> None:
    warnings.filterwarnings("ignore", category=PreviewWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--session-seconds", type=float, default=60.0, help="how long a session runs (default 60)")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0, help="the client's heartbeat_interval")
    parser.add_argument("--group-size", type=int, default=100, help="shards per fan-out step")
    parser.add_argument("--reply-topics", type=int, default=10, help="topics in reply_topics=[...]")
    parser.add_argument("--sessions", type=int, default=3, help="sessions measured per volume")
    parser.add_argument("--batch-bytes", type=float, help="billable bytes of one session's batches (skip measuring)")
    parser.add_argument("--batches", type=float, default=1.0, help="with --batch-bytes: batches per session")
    parser.add_argument("--heartbeat-bytes", type=float, default=180.0, help="with --batch-bytes: one heartbeat's bytes")
    args = parser.parse_args()

    if args.batch_bytes is not None:
        volumes = {"given": ReplyVolume(args.batches, args.batch_bytes, args.heartbeat_bytes)}
    else:
        volumes = measured_volumes(args.sessions)
    print(
        report(
            volumes, session_seconds=args.session_seconds, heartbeat_interval=args.heartbeat_interval,
            group_size=args.group_size, reply_topics=args.reply_topics,
        )
    )


if __name__ == "__main__":
    main()
