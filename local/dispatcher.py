"""Eventarc-like delivery for the local stack: pull a function's trigger subscription and POST each message to
the Functions Framework as Eventarc delivers it to a deployed function.

The emulator's push subscriptions deliver at most 2 messages at a time and retry a failure every second
forever; Eventarc scales the function up to its capacity and backs off. This process plays Eventarc (and Cloud
Run in front of the function). Run by ``LocalStack`` (one per trigger function, in its own process so that it
competes with neither the orchestrator's GIL nor its thread count)::

    python -m dagster_gcf_pipes.local.dispatcher --subscription projects/P/subscriptions/S \\
        --topic projects/P/topics/T --url http://127.0.0.1:PORT/ --capacity 100

**Eventarc semantics** (``--eventarc``: the local stack passes its ``production_semantics`` switch; alone, the
default unless ``GCF_PIPES_PRODUCTION_SEMANTICS=0``), as Google documents them:

- **Capacity**: a deployed function serves ``--max-instances`` × ``--concurrency`` requests at once
  (``--capacity``). Messages are pulled and pushed as they come, not held back for a free instance; a request
  above the capacity waits in Cloud Run's request queue up to ``QUEUE_SECONDS`` (10 s) for an instance to
  free up, and is then answered 429 without reaching the function
  (https://cloud.google.com/run/docs/about-instance-autoscaling, "Exceeding maximum instances").
- **Retries**: a 429, an error answer (not 2xx) or no answer is retried by the subscription's retry policy:
  exponential backoff from 10 s to 600 s (https://cloud.google.com/eventarc/docs/retry-events,
  https://cloud.google.com/functions/docs/writing/retries), a minimum and a maximum that Pub/Sub follows "on a
  best effort basis ... delay can be more or less than configured" (``RetryPolicy``): each delay is lengthened
  by up to 10 % at random, within 600 s. A message still not accepted when its next delivery would fall past
  the subscription's retention (Eventarc's: 24 h from its publication; ``--retention``) is given up (acked,
  logged, metered): Eventarc drops it.
- Not modelled: Pub/Sub's push window (it starts small and grows with successes), dead-letter topics, the
  function's request timeout, instances that start slowly (cold starts): an instance is free at once.

**Bare semantics** (``--no-eventarc``): the dispatcher pulls no more messages than the capacity (a slot is
taken before a message is pulled and given back when its POST answers: the rest wait in the subscription), so
nothing is ever answered 429, and a failure is retried after 1 s doubling to 60 s, forever.

Either way:

- **Body and headers**: a binary-mode CloudEvent ``google.cloud.pubsub.topic.v1.messagePublished``: the body
  is the Pub/Sub push body ``{"message": {...}, "subscription": ...}`` and the ``ce-*`` headers carry the
  event's id (the message id), source (the topic), type and time (the publish time). A ``traceparent`` (or the
  client library's ``googclient_traceparent``) message attribute goes out as ``traceparent`` and
  ``ce-traceparent``, as Eventarc propagates trace context.
- **Ack deadline**: messages are pulled, not streamed, so nothing extends their lease: a function that outlives
  the subscription's ack deadline is redelivered while it runs, as with push (and in production).
- **Reports**: a function server that refuses connections is logged loudly (``THE FUNCTION SERVER IS DOWN``,
  with its log file), since it is most likely dead. The first error answer after a success (or at start) is
  logged loudly too (``FUNCTION_FAILED``), with the end of the function's log: a ``@pipes_function`` answers
  2xx even when the handler raises (Dagster gets the error), so an error answer means the function failed
  outside its session (an entry point that is not a ``@pipes_function``, a crash at import). ``gcf-pipes
  up``/``dev`` show these lines.
- **Meter** (``--meter FILE``, next to the log as ``dispatcher-TOPIC.json``; ``read_meter``): the counts in
  ``COUNTS`` and every retry (message id, attempt, reason, delay), rewritten after each change.

**Fail fast** (``--fail-fast``; local tooling only: ``gcf-pipes dev``/``up`` and the pytest plugin set it,
never production, nor the tests of Eventarc's retries): a run waiting for a function that is down would only
fail at its ``startup_timeout``. So when the function server has refused connections for
``DOWN_GRACE_SECONDS`` (long enough for a restart after an edit or a crash to come up), or the function
answers with an error (it failed outside its Pipes session), the dispatcher answers the trigger in the
function's place, through the function side's own session machinery (``run_session``): it claims the
session's lease and closes the session with a ``LocalFunctionDown`` naming the function, why it is down and
the end of its log, so the step fails within seconds with that as its ``CloudFunctionError``. A message that
is not a Pipes trigger is left to the retries.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1.types import ReceivedMessage

from dagster_gcf_pipes.function.build import entry_point_problem
from dagster_gcf_pipes.function.session import run_session
from dagster_gcf_pipes.local.local_stack import log_tail
from dagster_gcf_pipes.local.production_semantics import ENVIRONMENT_VARIABLE, enabled_by_environment
from dagster_gcf_pipes.shared.pubsub import subscriber_client

EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"
#: Cloud Run: how long a request above the capacity waits for a free instance before it is answered 429
QUEUE_SECONDS = 10.0
#: Eventarc's subscriptions keep a message this long (seconds from its publication)
RETENTION_SECONDS = 24 * 3600
#: how long one POST may take: the longest a 2nd-gen event-driven function may run
REQUEST_TIMEOUT_SECONDS = 3600
PULL_RETRY_SECONDS = 1.0
#: the most messages one pull may ask for (Pub/Sub's limit); with Eventarc semantics also the most that may
#: wait for an instance at once
MAX_PULL = 1000

#: what ``_attempt`` answers besides an HTTP status: the server refused the connection, or never answered
REFUSED = -1
NO_ANSWER = 0
#: Cloud Run's answer when no instance freed up within ``QUEUE_SECONDS`` (the function never saw the request)
TOO_MANY_REQUESTS = 429
#: the message attributes a trace context may arrive in, first match wins
TRACEPARENT_ATTRIBUTES = ("traceparent", "googclient_traceparent")

#: starts the line that reports a function failing its deliveries (``gcf-pipes up``/``dev`` look for it)
FUNCTION_FAILED = "THE FUNCTION FAILED"
#: starts the line that reports a function server refusing connections
SERVER_DOWN = "THE FUNCTION SERVER IS DOWN"
#: how much of the function's log such a report quotes
LOG_LINES = 20
#: with fail-fast: how long the server may refuse connections (a restart under way) before the dispatcher
#: answers in its place, and how often it tries again meanwhile
DOWN_GRACE_SECONDS = 5.0
REFUSED_POLL_SECONDS = 0.25

#: the meter's counts: requests that reached the function; its 2xx answers; its error answers and requests it
#: never answered; connections its server refused; requests that waited for an instance and got one; requests
#: answered 429 (they never reached it); messages given up past the retention; triggers answered in its place
COUNTS = ("deliveries", "accepted", "errors", "refused", "queued", "rejected", "given_up", "stood_in")

_log = logging.getLogger("dagster_gcf_pipes.local.dispatcher")


class LocalFunctionDown(RuntimeError):
    """What a run fails with when the dispatcher answered its trigger in the function's place (fail-fast)."""


@dataclass(frozen=True)
class RetrySchedule:
    """When a message the function did not accept is delivered again: ``first`` seconds after the first
    failure, doubling up to ``cap``, each delay lengthened by up to ``jitter`` of itself (within ``cap``); given
    up once the next delivery would fall past ``retention`` seconds after its publication (None: never)."""

    first: float
    cap: float
    jitter: float = 0.0
    retention: float | None = None

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> int:
        """Seconds before the ``attempt``-th failed delivery of a message is retried (1-based), whole: it is
        the message's new ack deadline."""
        base = min(self.first * 2 ** min(attempt - 1, 16), self.cap)
        return math.ceil(round(min(base * (1 + self.jitter * rng()), self.cap), 6))  # no 11.000000001 -> 12


@dataclass(frozen=True)
class Semantics:
    name: str
    retry: RetrySchedule
    #: how long a request above the capacity waits for an instance before it is answered 429; None: no more is
    #: pulled than can run, so nothing waits
    queue_seconds: float | None


EVENTARC = Semantics("eventarc", RetrySchedule(10, 600, jitter=0.1, retention=RETENTION_SECONDS), QUEUE_SECONDS)
BARE = Semantics("bare", RetrySchedule(1, 60), queue_seconds=None)


def read_meter(dispatcher_log: Path) -> dict[str, Any]:
    """The meter of the dispatcher that logs to ``dispatcher_log`` (the local stack keeps it next to the log)."""
    return json.loads(dispatcher_log.with_suffix(".json").read_text())


@dataclass
class Meter:
    """What the dispatcher did (``COUNTS`` and every retry), rewritten to ``path`` as JSON after each change."""

    path: Path | None = None
    #: written with the counts: the semantics and the capacity, for whoever reads the file
    about: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    retries: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, about: dict[str, Any]) -> None:
        """Write the file at once, all counts zero, with ``about`` in it too."""
        with self._lock:
            self.about = about
            self._write()

    def count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1
            self._write()

    def retry(self, message_id: str, attempt: int, reason: str, delay: int) -> None:
        with self._lock:
            self.retries.append({"message_id": message_id, "attempt": attempt, "reason": reason, "delay": delay})
            self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps({**self.about, **self.counts, "retries": self.retries}))
        os.replace(partial, self.path)  # a reader never sees half a file


def push_request(message: ReceivedMessage, topic: str, subscription: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers Eventarc sends a Cloud Run service for one Pub/Sub message."""
    pubsub_message = message.message
    message_id = pubsub_message.message_id
    publish_time = pubsub_message.publish_time.rfc3339()
    attributes = dict(pubsub_message.attributes)
    body_message: dict[str, object] = {
        "data": base64.b64encode(pubsub_message.data).decode(),
        "attributes": attributes,
        "messageId": message_id,
        "message_id": message_id,
        "publishTime": publish_time,
        "publish_time": publish_time,
    }
    if pubsub_message.ordering_key:
        body_message["orderingKey"] = pubsub_message.ordering_key
    headers = {
        "Content-Type": "application/json",
        "ce-id": message_id,
        "ce-source": f"//pubsub.googleapis.com/{topic}",
        "ce-specversion": "1.0",
        "ce-type": EVENT_TYPE,
        "ce-time": publish_time,
    }
    traceparent = next((attributes[k] for k in TRACEPARENT_ATTRIBUTES if attributes.get(k)), None)
    if traceparent:
        headers["traceparent"] = headers["ce-traceparent"] = traceparent
    body = json.dumps({"message": body_message, "subscription": subscription}).encode()
    return body, headers


@dataclass
class Dispatcher:
    subscription: str
    topic: str
    url: str
    #: requests the function serves at once (max instances × per-instance concurrency)
    capacity: int
    semantics: Semantics = EVENTARC
    #: the function's source and entry point (path/main.py:main) and its server's log, named in reports
    function: str = ""
    function_log: str = ""
    fail_fast: bool = False
    meter: Meter = field(default_factory=Meter)
    #: no receive limit on the emulator's channel, as on production channels: a trigger up to Pub/Sub's 10 MB
    subscriber: pubsub_v1.SubscriberClient = field(default_factory=subscriber_client)
    _failures: dict[str, int] = field(default_factory=dict)  # message id -> failed deliveries so far
    #: the last answer was an error: the next ones are not reported loudly again until a delivery succeeds
    _failing: bool = False
    #: since when (time.monotonic()) the server refuses connections, None while it accepts them
    _refusing_since: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _instances: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self._instances = threading.BoundedSemaphore(self.capacity)

    @property
    def outstanding(self) -> int:
        """The most messages pulled and not yet settled: the capacity when nothing may wait for an instance;
        else up to ``MAX_PULL`` more wait in Cloud Run's request queue."""
        return self.capacity if self.semantics.queue_seconds is None else self.capacity + MAX_PULL

    def run(self) -> None:
        """Deliver until the process is stopped or the subscription is deleted."""
        slots = threading.BoundedSemaphore(self.outstanding)
        # the meter first: the "delivering" line is what the local stack waits for, and a reader of the meter
        # may come right after it (a fresh-clone run read it before it was written)
        self.meter.start({"semantics": self.semantics.name, "capacity": self.capacity})
        _log.info("delivering %s to %s: capacity %d, %s semantics%s", self.subscription, self.url, self.capacity,
                  self.semantics.name, ", fail-fast" if self.fail_fast else "")
        with ThreadPoolExecutor(max_workers=self.outstanding, thread_name_prefix="deliver") as pool:
            while True:
                free = self._take_slots(slots)
                received = self._pull(free)
                for _ in range(free - len(received)):
                    slots.release()
                for message in received:
                    pool.submit(self._deliver, message, slots)

    def _take_slots(self, slots: threading.BoundedSemaphore) -> int:
        """Wait for one free slot, then take every other free one (up to a pull's worth)."""
        slots.acquire()
        free = 1
        while free < min(self.outstanding, MAX_PULL) and slots.acquire(blocking=False):
            free += 1
        return free

    def _pull(self, max_messages: int) -> list[ReceivedMessage]:
        try:
            response = self.subscriber.pull(subscription=self.subscription, max_messages=max_messages, timeout=30)
        except gexc.NotFound:
            _log.error("%s no longer exists: nothing left to deliver, stopping", self.subscription)
            raise SystemExit(0) from None
        except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
            _log.warning("pulling %s failed, retrying in %gs: %s", self.subscription, PULL_RETRY_SECONDS, exc)
            time.sleep(PULL_RETRY_SECONDS)
            return []
        return list(response.received_messages)

    def _deliver(self, message: ReceivedMessage, slots: threading.BoundedSemaphore) -> None:
        try:
            status = self._attempt(message)
            failure = self._failure(message, status)
            if failure is not None and self.fail_fast and status not in (NO_ANSWER, TOO_MANY_REQUESTS):
                failure = None if self._stand_in(message, status) else failure
            self._settle(message, failure)
        except Exception:  # noqa: BLE001 - a delivery must never die silently: the message is retried
            _log.exception("the delivery of message %s failed", message.message.message_id)
        finally:
            slots.release()

    def _attempt(self, message: ReceivedMessage) -> int:
        """Deliver once, on a free instance: the function's HTTP status, ``NO_ANSWER``, ``REFUSED``, or
        ``TOO_MANY_REQUESTS`` when no instance freed up within the queue window (the function never saw it)."""
        if not self._instances.acquire(blocking=False):
            if not self._instances.acquire(timeout=self.semantics.queue_seconds):
                self.meter.count("rejected")
                return TOO_MANY_REQUESTS
            self.meter.count("queued")
        try:
            status = self._post(message)
            while status == REFUSED and self.fail_fast and self._may_come_back():
                time.sleep(REFUSED_POLL_SECONDS)
                status = self._post(message)
            return status
        finally:
            self._instances.release()

    def _post(self, message: ReceivedMessage) -> int:
        """POST one message: its HTTP status, ``NO_ANSWER`` or ``REFUSED``."""
        body, headers = push_request(message, self.topic, self.subscription)
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (ConnectionRefusedError, urllib.error.URLError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if not isinstance(reason, ConnectionRefusedError):
                _log.warning("POST to %s failed: %s", self.url, reason)
                status = NO_ANSWER
            else:
                self._refused(reason)
                return REFUSED
        except OSError as exc:
            _log.warning("POST to %s failed: %s", self.url, exc)
            status = NO_ANSWER
        with self._lock:
            self._refusing_since = None
        self.meter.count("deliveries")
        return status

    def _refused(self, exc: BaseException) -> None:
        """Note a refused connection; the first of a row is reported loudly."""
        self.meter.count("refused")
        with self._lock:
            first = self._refusing_since is None
            if first:
                self._refusing_since = time.monotonic()
        if first:
            _log.error(
                "%s: %s refused the connection (%s). Messages stay in %s and are retried; check the server's log%s",
                SERVER_DOWN, self.url, exc, self.subscription, f" ({self.function_log})" if self.function_log else "",
            )

    def _may_come_back(self) -> bool:
        """Whether the server has refused connections for less than the grace (a restart may be under way)."""
        with self._lock:
            since = self._refusing_since
        return since is not None and time.monotonic() - since < DOWN_GRACE_SECONDS

    def _failure(self, message: ReceivedMessage, status: int) -> str | None:
        """None when the function accepted the message; else why it was not accepted (counted, reported)."""
        if 200 <= status < 300:
            self.meter.count("accepted")
            with self._lock:
                self._failing = False
            return None
        if status == TOO_MANY_REQUESTS:
            return f"429, no instance free within {self.semantics.queue_seconds:g}s"
        if status == REFUSED:
            return "the server refused the connection"
        self.meter.count("errors")
        if status == NO_ANSWER:
            return "no answer"
        self._report(message, status)
        return f"HTTP {status}"

    def _report(self, message: ReceivedMessage, status: int) -> None:
        """Report the first error answer after a success (or at start) loudly, with the end of the function's log."""
        with self._lock:
            first, self._failing = not self._failing, True
        if first:
            _log.error(
                "%s message %s of %s with HTTP %d: it failed outside its Pipes session (is its entry point a "
                "@pipes_function? does it import?), %s. The end of the function's log (%s):\n%s",
                FUNCTION_FAILED, message.message.message_id, self.topic, status,
                "so the dispatcher answers in its place: a run waiting for it fails now, with this error"
                if self.fail_fast else
                "so a run waiting for it fails only at its startup_timeout. The message is retried",
                self.function_log, self._function_log_tail(),
            )

    def _function_log_tail(self) -> str:
        return log_tail(Path(self.function_log), LOG_LINES) if self.function_log else "(its log is not known)"

    def _stand_in(self, message: ReceivedMessage, status: int) -> bool:
        """Answer a Pipes trigger in the function's place (fail-fast): run its session with a handler that
        raises ``LocalFunctionDown``. True once answered: the message is then acked, as the function acks a
        trigger it answered; False for a message that is not a Pipes trigger, or when answering failed."""
        why = self._why_down(status)

        def handler(pipes: object, payload: object) -> None:
            raise LocalFunctionDown(why)

        pubsub_message = message.message
        try:
            outcome = run_session(
                handler, pubsub_message.data, dict(pubsub_message.attributes),
                message_id=pubsub_message.message_id, publish_time=pubsub_message.publish_time.timestamp(),
            )
        except Exception:  # noqa: BLE001 - the message is retried as if nobody had answered
            _log.exception("answering message %s in the function's place failed", pubsub_message.message_id)
            return False
        if outcome.session_id is None:
            return False
        self.meter.count("stood_in")
        _log.error("answered message %s (session %s) in the function's place (fail-fast): %s",
                   pubsub_message.message_id, outcome.session_id, why)
        return True

    def _why_down(self, status: int) -> str:
        """The error a run fails with when the dispatcher answers in the function's place: which function, what
        happened, what its source says (the build's entry-point check) and the end of its log."""
        if status == REFUSED:
            what = f"is down: its server ({self.url}) has refused connections for {DOWN_GRACE_SECONDS:g}s and more"
        else:
            what = (f"answered its trigger with HTTP {status}: it failed outside its Pipes session (is its entry "
                    "point a @pipes_function? does it import?)")
        source, _, target = self.function.rpartition(":")
        problem = entry_point_problem(Path(source), target) if source.endswith(".py") else None  # not Node.js
        return (
            f"the local function {self.function or self.url} (trigger topic {self.topic}) {what}. The local "
            "stack answered this trigger in its place so that the run fails now rather than at its "
            "startup_timeout; fix the function (gcf-pipes dev and up restart it when you save) and run again."
            + (f"\nIts source: {problem}" if problem else "")
            + f"\nThe end of its log ({self.function_log or 'not known'}):\n{self._function_log_tail()}"
        )

    def _settle(self, message: ReceivedMessage, failure: str | None) -> None:
        """Ack an accepted message; else leave it to be retried after the backoff for its failures so far, or
        give it up if that retry would fall past the retention."""
        message_id = message.message.message_id
        with self._lock:
            attempt = 0 if failure is None else self._failures.get(message_id, 0) + 1
            if attempt:
                self._failures[message_id] = attempt
            else:
                self._failures.pop(message_id, None)
        try:
            if failure is None:
                self._ack(message)
                return
            delay = self.semantics.retry.delay(attempt)
            retention = self.semantics.retry.retention
            if retention is not None and time.time() + delay > message.message.publish_time.timestamp() + retention:
                _log.error("giving message %s up after %d attempts (last: %s): its next delivery, in %ds, would fall "
                           "past the subscription's retention (%gs from its publication), as Eventarc drops it",
                           message_id, attempt, failure, delay, retention)
                self._ack(message)
                self.meter.count("given_up")
                with self._lock:
                    self._failures.pop(message_id, None)
                return
            _log.warning("message %s was not accepted (attempt %d: %s); retrying in %ds", message_id, attempt,
                         failure, delay)
            self.meter.retry(message_id, attempt, failure, delay)
            self.subscriber.modify_ack_deadline(
                subscription=self.subscription, ack_ids=[message.ack_id], ack_deadline_seconds=delay, timeout=30
            )
        except gexc.GoogleAPICallError as exc:  # the ack deadline passed first: Pub/Sub redelivers the message
            _log.warning("settling message %s failed (it will be redelivered): %s", message_id, exc)

    def _ack(self, message: ReceivedMessage) -> None:
        self.subscriber.acknowledge(subscription=self.subscription, ack_ids=[message.ack_id], timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscription", required=True, help="projects/P/subscriptions/S to pull")
    parser.add_argument("--topic", required=True, help="projects/P/topics/T, the CloudEvent's source")
    parser.add_argument("--url", required=True, help="the Functions Framework to POST to")
    parser.add_argument("--capacity", type=int, default=100,
                        help="requests the function serves at once: its max instances times their concurrency")
    parser.add_argument("--eventarc", action=argparse.BooleanOptionalAction, default=enabled_by_environment(),
                        help=f"Eventarc's semantics (429 above the capacity, retries after 10 s to 600 s for 24 h); "
                             f"without: no more pulled than the capacity, retries after 1 s to 60 s (default: on "
                             f"unless {ENVIRONMENT_VARIABLE}=0)")
    parser.add_argument("--retention", type=float,
                        help="seconds after its publication a message not accepted is given up (Eventarc: 24 h)")
    parser.add_argument("--fail-fast", action="store_true",
                        help="answer a trigger in the function's place when its server is down or it fails outside "
                             "its Pipes session, so that the run fails now (local tooling only)")
    parser.add_argument("--function", default="", help="the function's source and entry point, named in errors")
    parser.add_argument("--function-log", default="", help="the function server's log file, named in errors")
    parser.add_argument("--meter", default="", help="the JSON file to keep the counts in")
    args = parser.parse_args(argv)
    if args.capacity < 1:
        parser.error(f"--capacity={args.capacity} must be at least 1")
    semantics = EVENTARC if args.eventarc else BARE
    if args.retention is not None:
        semantics = replace(semantics, retry=replace(semantics.retry, retention=args.retention))
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    meter = Meter(Path(args.meter) if args.meter else None)
    Dispatcher(args.subscription, args.topic, args.url, args.capacity, semantics, function=args.function,
               function_log=args.function_log, fail_fast=args.fail_fast, meter=meter).run()


if __name__ == "__main__":
    main()
