"""The end of a session, on the real local stack: durable until the trigger's start window has passed (a late
or duplicate delivery, pushed or pulled, neither runs nor leaves anything behind), enforced at the function's
timeout on both sides, reached at once when a run or a fan-out is interrupted, and independent of the
orchestrator's clock."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from dagster_gcf_pipes.orchestrator import client as client_module

from tests.integration.helpers import make_client, run_asset, session_objects, session_subscriptions


def test_an_orchestrator_clock_minutes_behind_does_not_make_triggers_late(stack, monkeypatch: pytest.MonkeyPatch):
    """Before: the trigger carried the orchestrator's wall-clock deadline, so a clock 5 minutes slow made the
    function refuse every trigger as late. Now the function counts the window from Pub/Sub's publishTime."""
    # The orchestrator's wall clock, 5 minutes slow (patched where the client reads it: gRPC's own deadlines
    # need the real clock in this process).
    skewed = SimpleNamespace(time=lambda: time.time() - 300, monotonic=time.monotonic, sleep=time.sleep)
    monkeypatch.setattr(client_module, "time", skewed)
    outcome = run_asset(make_client(startup_timeout=10.0), {"n": 7})

    assert outcome.result.success, outcome.failure_message
    assert outcome.metadata["n"] == 7
    assert session_subscriptions(stack.project) == []
    assert session_objects(stack.project) == []
