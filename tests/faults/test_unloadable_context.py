"""A session whose Pipes context cannot be loaded (its claim-checked context object is gone or unreadable) is
reported to Dagster at once, as ``opened`` then ``closed`` with the error, instead of sending nothing and
leaving the step to wait out its startup timeout (dagster-pipes loads the context before it opens the reply
channel)."""

from __future__ import annotations

from dagster_pipes import encode_param

from dagster_gcf_pipes.shared.protocol import Trigger
from tests.functions.main import main as scenario_function
from tests.integration.function_harness import FunctionHarness


def test_a_context_object_that_is_gone_is_reported_through_closed(stack) -> None:
    h = FunctionHarness(stack, {"n": 1})
    try:
        trigger = Trigger.decode(h.data, h.attributes)
        missing = {"bucket": "pipes-payloads", "key": f"harness/{h.session_id}/context.json"}  # never written
        bootstrap = {**trigger.bootstrap, "DAGSTER_PIPES_CONTEXT": encode_param(missing)}
        h.data, h.attributes = Trigger(h.session_id, dict(trigger.payload), bootstrap).encode()

        outcome = scenario_function(h.cloud_event())

        assert not outcome.ran  # the handler never started: nothing ran twice on a redelivery either
        messages = h.read_until_closed(timeout=20)
        assert [m["method"] for m in messages] == ["opened", "closed"]
        exception = messages[-1]["params"]["exception"]
        assert "context" in exception["message"].lower() or "404" in exception["message"], exception["message"]
    finally:
        h.close()
