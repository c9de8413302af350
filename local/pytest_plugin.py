"""A pytest plugin for testing your own function on the local stack (registered as ``gcf_pipes`` through the
``pytest11`` entry point; installed with the ``local`` extra).

Opt-in: nothing starts unless a test asks for the ``gcf_pipes`` fixture. Name the function with a marker, or
for every test with the ``gcf_pipes_function`` ini option::

    @pytest.mark.gcf_pipes(function="my_function/main.py:main")
    def test_sales(gcf_pipes):
        result = materialize([sales], resources={"pipes": gcf_pipes.client})

The stack (emulators and one Functions Framework server per function) starts once per test session; paths
are relative to pytest's rootdir. ``gcf_pipes.client`` is a ``PipesPubSubClient`` wired to the function's
trigger topic, a reply topic and a bucket of the stack; ``gcf_pipes.stack`` is the ``LocalStack`` (its
``environment``, ``servers`` and log files). While a test uses the fixture, the process's Google clients point
at the emulators.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the plugin loads in every pytest session: import the library only when a test asks
    from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
    from dagster_gcf_pipes.orchestrator import PipesPubSubClient

REPLY_TOPIC = "gcf-pipes-replies"
BUCKET = "gcf-pipes-payloads"
MARKER = "gcf_pipes"
INI_OPTION = "gcf_pipes_function"


@dataclass(frozen=True)
class LocalPipes:
    """What a test gets: the client to hand to Dagster, the stack, and the function it serves."""

    client: PipesPubSubClient
    stack: LocalStack
    function: LocalFunction


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(INI_OPTION, "the function the gcf_pipes fixture serves by default: path/to/main.py:entry_point")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(function='path/to/main.py:entry', **settings): the function the gcf_pipes fixture serves, "
        "and PipesPubSubClient settings for its client",
    )


class _Functions:
    """The stack of the test session, with each function served once, on a trigger topic of its own."""

    def __init__(self, rootdir: Path) -> None:
        self.rootdir = rootdir
        self.stack: LocalStack | None = None
        self.served: dict[tuple[str, str], LocalFunction] = {}

    def serve(self, spec: str) -> LocalFunction:
        from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack, LocalStackError, parse_function_spec

        try:
            source, target = parse_function_spec(spec, self.rootdir)
        except LocalStackError as exc:
            raise pytest.UsageError(f"{MARKER}: {exc}") from None
        key = (str(source), target)
        if key not in self.served:
            if self.stack is None:
                self.stack = LocalStack(topics=[REPLY_TOPIC], buckets=[BUCKET]).__enter__()
            topic = "gcf-pipes-trigger-" + hashlib.sha256("/".join(key).encode()).hexdigest()[:12]
            function = LocalFunction(source, target, topic)
            self.stack.add_function(function)
            self.served[key] = function
        return self.served[key]

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()


@pytest.fixture(scope="session")
def gcf_pipes_functions(request: pytest.FixtureRequest) -> Iterator[_Functions]:
    functions = _Functions(request.config.rootpath)
    yield functions
    functions.stop()


@pytest.fixture
def gcf_pipes(request: pytest.FixtureRequest, gcf_pipes_functions: _Functions) -> Iterator[LocalPipes]:
    """Serve the marker's (or the ini option's) function on the local stack and yield a client for it."""
    from dagster_gcf_pipes.orchestrator import PipesPubSubClient

    marker = request.node.get_closest_marker(MARKER)
    settings: dict[str, Any] = dict(marker.kwargs) if marker else {}
    spec = settings.pop("function", None) or (marker.args[0] if marker and marker.args else None)
    spec = spec or request.config.getini(INI_OPTION)
    if not spec:
        raise pytest.UsageError(
            f"the gcf_pipes fixture needs a function: @pytest.mark.{MARKER}(function='path/main.py:entry') on the "
            f"test, or `{INI_OPTION} = path/main.py:entry` in your pytest configuration"
        )
    function = gcf_pipes_functions.serve(spec)
    stack = gcf_pipes_functions.stack
    assert stack is not None
    client = PipesPubSubClient(project=stack.project, trigger_topic=function.trigger_topic, reply_topic=REPLY_TOPIC,
                               bucket=BUCKET, **settings)
    with stack.activated():
        yield LocalPipes(client=client, stack=stack, function=function)
