"""A pytest plugin for testing your own function on the local stack (registered as ``gcf_pipes`` through the
``pytest11`` entry point; installed with the ``local`` extra).

Opt-in: nothing starts unless a test asks for the ``gcf_pipes`` fixture. Name the function with a marker, or
for every test with the ``gcf_pipes_function`` ini option::

    @pytest.mark.gcf_pipes(function="my_function/main.py:main")
    def test_sales(gcf_pipes):
        result = materialize([sales], resources={"pipes": gcf_pipes.client})

A Node.js function is named the same way, by its ``.js`` file (``function="my_node_function/index.js:main"``)
or its folder with a package.json: Google's Node.js Functions Framework serves it from the folder's
node_modules (``npm ci`` there first if it is missing; ``LocalFunction``).

The stack (emulators and one Functions Framework server per function) starts once per test session; paths
are relative to pytest's rootdir. ``gcf_pipes.client`` is a ``PipesPubSubClient`` wired to the function's
trigger topic, a reply topic and a bucket of the stack; the marker's other keywords are its settings, and
override those (``reply_topics=[...]`` replaces the reply topic; the topics and bucket it names are created).
``gcf_pipes.stack`` is the ``LocalStack`` (its ``environment``, ``servers`` and log files). While a test uses
the fixture, the process's Google clients point at the emulators. A failed test's report ends with what the
function logged during it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterator
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
#: the most lines of the function's log a failed test's report shows
LOG_LINES = 40


@dataclass(frozen=True)
class LocalPipes:
    """What a test gets: the client to hand to Dagster, the stack, and the function it serves."""

    client: PipesPubSubClient
    stack: LocalStack
    function: LocalFunction


@dataclass(frozen=True)
class _LogMark:
    """Where the function's log stood when a test started: its report shows what came after."""

    path: Path
    offset: int

    @classmethod
    def now(cls, path: Path) -> _LogMark:
        return cls(path, path.stat().st_size if path.exists() else 0)

    def since(self) -> str:
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            lines = log.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-LOG_LINES:]) or "(nothing)"


_LOG_MARK = pytest.StashKey[_LogMark]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(INI_OPTION, "the function the gcf_pipes fixture serves by default: path/to/main.py:entry_point "
                              "(or a Node.js function's path/to/index.js:entry_point)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(function='path/to/main.py:entry', **settings): the function the gcf_pipes fixture serves (a "
        "Node.js one by its index.js or folder), and PipesPubSubClient settings for its client",
    )


class _Functions:
    """The stack of the test session, with each function served once, on a trigger topic of its own."""

    def __init__(self, rootdir: Path) -> None:
        self.rootdir = rootdir
        self.stack: LocalStack | None = None
        self.served: dict[tuple[str, str], LocalFunction] = {}

    def serve(self, spec: str) -> LocalFunction:
        """The function ``spec`` names, served; a test error of one line if it cannot be (no traceback)."""
        from dagster_gcf_pipes.local.local_stack import LocalStackError

        try:
            return self._serve(spec)
        except LocalStackError as exc:  # the spec names no function, or its server did not start (its log says why)
            problem = f"{MARKER}: {exc}"
        pytest.fail(problem, pytrace=False)  # outside the except: no "during handling of the above exception"

    def _serve(self, spec: str) -> LocalFunction:
        from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack, parse_function_spec

        source, target = parse_function_spec(spec, self.rootdir)
        key = (str(source), target)
        if key not in self.served:
            if self.stack is None:
                self.stack = LocalStack(topics=[REPLY_TOPIC], buckets=[BUCKET]).__enter__()
            topic = "gcf-pipes-trigger-" + hashlib.sha256("/".join(key).encode()).hexdigest()[:12]
            # fail_fast: a test of a function that is down, or fails outside its Pipes session, fails within
            # seconds with its error rather than at its startup_timeout (dispatcher.py)
            function = LocalFunction(source, target, topic, fail_fast=True)
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
    defaults: dict[str, Any] = {"project": stack.project, "trigger_topic": function.trigger_topic,
                                "reply_topic": REPLY_TOPIC, "bucket": BUCKET}
    if "reply_topics" in settings:
        del defaults["reply_topic"]
    settings = {**defaults, **settings}
    stack.create_topics(t for t in (settings.get("reply_topic"), settings.get("detached_reply_topic"),
                                    *(settings.get("reply_topics") or [])) if t)
    stack.create_buckets([settings["bucket"]])
    client = PipesPubSubClient(**settings)
    request.node.stash[_LOG_MARK] = _LogMark.now(stack.server_of(function).log_path)
    with stack.activated():
        yield LocalPipes(client=client, stack=stack, function=function)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that used the fixture: add what its function logged meanwhile (its log's path and end),
    where a function that failed outside its Pipes session (e.g. an entry point that is not a
    @pipes_function) says why, while the test itself only saw a startup timeout."""
    report = yield
    mark = item.stash.get(_LOG_MARK, None)
    if report.failed and mark is not None:
        report.sections.append((f"the function's log during the test ({mark.path})", mark.since()))
    return report
