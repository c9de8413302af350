"""The local stack's production-semantics layer: a gRPC proxy between the Pub/Sub client libraries and
Google's Pub/Sub emulator that behaves like production Pub/Sub where the emulator does not (filters applied,
pull races, at-least-once delivery and no order, NOT_FOUND after creation, lost admin responses, the admin
quota, delivery latency) and meters what a run costs (admin operations, calls, delivered and published bytes).

``LocalStack`` starts it in front of its emulator unless ``LocalStack(production_semantics=False)`` or
``GCF_PIPES_PRODUCTION_SEMANTICS=0``; the clients find it through ``PUBSUB_EMULATOR_HOST``, and nothing in the
library's runtime code knows it is there. ``stack.semantics`` is its control client (``SemanticsClient``).
The behaviours, each with its source, are in ``behaviours.py`` and docs/architecture.md ("The
production-semantics layer").

Modules: ``proxy`` (the gRPC server), ``delivery`` (what happens to delivered messages and their acks),
``subscriptions`` (what the layer knows of each), ``admin`` (admin calls and their quota), ``filters``
(Pub/Sub's filter language), ``meter``, ``behaviours`` (the settings), ``control`` and ``client`` (the control
endpoint and its client); ``python -m dagster_gcf_pipes.local.production_semantics`` runs it.
"""

from __future__ import annotations

import os

from dagster_gcf_pipes.local.production_semantics.behaviours import Behaviours
from dagster_gcf_pipes.local.production_semantics.client import SemanticsClient
from dagster_gcf_pipes.local.production_semantics.meter import Counts, Meter

#: the switch, read by the local stack (and its Eventarc stand-in): any of 0, false, no, off turns it off
ENVIRONMENT_VARIABLE = "GCF_PIPES_PRODUCTION_SEMANTICS"


def enabled_by_environment() -> bool:
    """Whether the environment leaves the layer on (it is on unless ``GCF_PIPES_PRODUCTION_SEMANTICS`` is off)."""
    return os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


__all__ = ["ENVIRONMENT_VARIABLE", "Behaviours", "Counts", "Meter", "SemanticsClient", "enabled_by_environment"]
