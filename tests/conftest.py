"""Fixtures on the real local stack: Google's Pub/Sub emulator, fake-gcs-server, the Functions Framework.

The stack is started once per test session on free loopback ports and stopped after; a missing emulator
fails the tests with the install command, it never skips them."""

from __future__ import annotations

from collections.abc import Iterator

# Import hypothesis while the interpreter is fresh: if its pytest plugin first imports it at the end of a
# long session, CPython 3.11.7's compiler can fail the assertion-rewrite with "SystemError: AST constructor
# recursion depth mismatch" (a CPython bug fixed in 3.11.8), failing an otherwise green run.
import hypothesis  # noqa: F401
import pytest

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from dagster_gcf_pipes.orchestrator.client.functions_api import clear_cache
from tests.fakes.function_service import FakeFunctionService, running_fake

EXAMPLE_TOPIC = "pipes-trigger"
TEST_TOPIC = "test-trigger"
REPLY_TOPIC = "pipes-replies"
REPLY_SHARDS = ["pipes-replies-a", "pipes-replies-b", "pipes-replies-c"]  # reply_topics=[...]
DETACHED_TOPIC = "pipes-detached-replies"  # the example definitions' detached replies ...
DETACHED_SUBSCRIPTION = "pipes-detached-completions"  # ... and the durable subscription their sensor reads
HTTP_TARGET = "main_http"  # the test function's HTTP entry point, at stack.function_urls[HTTP_TARGET]
SCRIPTED_TOPIC = "scripted-trigger"  # no function behind it: tests play the function by hand
PAYLOAD_BUCKET = "pipes-payloads"
LAKE_BUCKET = "data-lake"


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    functions = [
        LocalFunction("examples/sales/function/main.py", "main", EXAMPLE_TOPIC),
        LocalFunction("tests/functions/main.py", "main", TEST_TOPIC),
        LocalFunction("tests/functions/main.py", HTTP_TARGET),  # invoked over HTTP: no trigger topic
    ]
    with LocalStack(
        functions=functions,
        topics=[REPLY_TOPIC, *REPLY_SHARDS, SCRIPTED_TOPIC, DETACHED_TOPIC],
        buckets=[PAYLOAD_BUCKET, LAKE_BUCKET],
        subscriptions={DETACHED_SUBSCRIPTION: DETACHED_TOPIC},
    ) as running:
        with running.activated():
            yield running


@pytest.fixture(autouse=True)
def _stack_alive(request: pytest.FixtureRequest) -> None:
    """Fail a test on the stack at once, with the server's log, if one of the stack's servers died."""
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").check()


@pytest.fixture
def fake() -> Iterator[FakeFunctionService]:
    """An in-process gRPC fake of the Cloud Functions v2 FunctionService, with an empty resolution cache."""
    clear_cache()
    with running_fake() as running:
        yield running
    clear_cache()
