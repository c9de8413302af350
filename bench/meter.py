"""The production-semantics layer's meter around a measured run, as the bench reports it.

``metered(stack)`` resets the meter, runs the block and reads the meter; ``figures(meter, units, ...)`` turns
the reading into per-session (or per-shard) counts for the results JSON; ``table(...)`` prints them. On a
bare-emulator stack there is no layer and so no meter: its rows show none (``None`` in the JSON).
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dagster_gcf_pipes.local.local_stack import LocalStack
from dagster_gcf_pipes.local.production_semantics.meter import Counts, Meter

#: what a session's subscriptions did (the trigger's push subscription is Eventarc's, counted apart)
DELIVERY = (
    "pull_calls", "streaming_pulls_opened", "acknowledge_calls", "modify_ack_deadline_calls",
    "messages_delivered", "bytes_delivered", "messages_filtered_out", "bytes_filtered_out",
)
PUBLISH = ("publish_requests", "messages_published", "bytes_published", "billed_publish_bytes")


@dataclass
class Reading:
    """Filled by ``metered`` when its block ends: the meter's snapshot, or ``None`` on a bare emulator."""

    meter: Meter | None = None


@contextmanager
def metered(stack: LocalStack) -> Iterator[Reading]:
    reading = Reading()
    if stack.semantics is not None:
        stack.semantics.reset_meter()
    yield reading
    if stack.semantics is not None:
        reading.meter = stack.semantics.meter()


def _sum(counts: list[Counts], names: tuple[str, ...], units: float) -> dict[str, float]:
    return {name: sum(getattr(c, name) for c in counts) / units for name in names}


def figures(meter: Meter | None, units: float, *, trigger_subscription: str, reply_topic: str) -> dict[str, Any] | None:
    """Per unit (session or shard): admin operations by method and in all; the delivery counts of the
    session's own subscriptions (``replies``, filtered-out included) and of the trigger's push subscription
    (``trigger``); what was published in all and on the reply topic."""
    if meter is None:
        return None
    replies = [c for path, c in meter.subscriptions.items() if path != trigger_subscription]
    return {
        "units": units,
        "admin_ops": {method: count / units for method, count in sorted(meter.total.admin_ops.items())},
        "admin_ops_total": meter.total.admin_ops_total / units,
        "replies": _sum(replies, DELIVERY, units),
        "trigger": _sum([meter.subscription(trigger_subscription)], DELIVERY, units),
        "published": _sum([meter.total], PUBLISH, units),
        "reply_topic": _sum([meter.topic(reply_topic)], PUBLISH, units),
    }


def _admin(figure: Mapping[str, Any]) -> str:
    methods = ", ".join(f"{method.removesuffix('Subscription')} {count:g}" for method, count in figure["admin_ops"].items())
    return f"{figure['admin_ops_total']:g} ({methods})" if methods else "0"


def table(rows: Mapping[str, Mapping[str, Any] | None], unit: str) -> str:
    """One line per row: the meter's counts per ``unit``, as the bench prints them."""
    lines = [
        f"| {unit} | admin ops (by method) | Pull | StreamingPull opened | Acknowledge | ModifyAckDeadline | "
        "delivered msgs / bytes | of which filtered out | trigger delivered msgs | reply publishes: requests / msgs / bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, figure in rows.items():
        if figure is None:
            lines.append(f"| {name} | no meter (bare emulator) |" + " |" * 8)
            continue
        r, t, p = figure["replies"], figure["trigger"], figure["reply_topic"]
        lines.append(
            f"| {name} | {_admin(figure)} | {r['pull_calls']:g} | {r['streaming_pulls_opened']:g} | "
            f"{r['acknowledge_calls']:g} | {r['modify_ack_deadline_calls']:g} | "
            f"{r['messages_delivered']:g} / {r['bytes_delivered']:,.0f} | "
            f"{r['messages_filtered_out']:g} / {r['bytes_filtered_out']:,.0f} | {t['messages_delivered']:g} | "
            f"{p['publish_requests']:g} / {p['messages_published']:g} / {p['bytes_published']:,.0f} |"
        )
    return "\n".join(lines)
