"""The pull worker: the same trigger messages and the same decorated handler, without a time limit.

    gcf-pipes worker --subscription pipes-trigger-worker --target main:main
    python -m dagster_gcf_pipes.function.worker --subscription pipes-trigger-worker --target main:main

Event-driven Cloud Functions stop at their timeout (9 minutes at most) and a push subscription redelivers
a message whose request outlives its ack deadline. This worker pulls the trigger topic's messages instead,
keeps extending each message's ack deadline while its session runs (up to ``--max-lease-duration``) and
acks when the session has ended. Run it wherever long work belongs: Cloud Run jobs or services, GKE, a VM.

It leases no message it cannot start: it pulls (synchronous pull) only when one of its ``--max-sessions``
slots is free, and asks for at most as many messages as slots are free, so a busy worker never holds
triggers that an idle worker on the same subscription could run. The client library's streaming pull
cannot promise that: its ``FlowControl.max_messages`` is only a hint to the server, and every message the
stream delivers beyond it is put on hold inside the client, its lease extended until a slot frees up (on
the emulator one worker held and ran all 6 of 6 triggers while a second worker idled).

What is acked when:
* the session ran (the handler returned, or raised and the error reached Dagster through ``closed``): ack;
* the trigger cannot run (malformed in any field, past its start deadline, its bucket missing, its lease
  held by another attempt): ack, since a redelivery could never help (the reason is logged, once);
* the session could not be set up (``run_session`` itself raised, e.g. Cloud Storage unreachable past its
  retry budget while taking the lease): handed back with a backoff, its ack deadline set to
  ``retry_backoff(attempt)`` (10 s doubling to 600 s, jittered), so Pub/Sub redelivers it to this or another
  worker then, never at once; the trigger's start window ends the retries (a late delivery is acked).

On SIGTERM or SIGINT the worker pulls no more (a message a pull returns meanwhile is nacked at once) and
gives running sessions ``--shutdown-grace`` seconds to end, their leases still extended; a session that
ends within the grace is acked as above. A session still running after the grace is abandoned: its message
is nacked (handed back at once, so that a live worker and the session lease decide its fate now rather than
when its ack deadline lapses; if the nack cannot be sent, the deadline lapses within ``LEASE_EXTENSION``
seconds anyway), it is never acked afterwards, and the process exits without waiting for its handler
thread. Exit codes:

* 0 (``EXIT_OK``): stopped by a signal; every session ended within the grace;
* 1 (``EXIT_PULL_FAILED``): pulling failed for good (subscription missing, permission denied, Pub/Sub
  unreachable past the retry budget); running sessions were given the grace first;
* 2 (``EXIT_USAGE``): a bad command line (argparse's own code);
* 3 (``EXIT_ABANDONED``): stopped by a signal, and at least one session was still running after the
  grace: abandoned, its message nacked for redelivery.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from dagster_gcf_pipes.function.logs import LOGGER_NAME, configure_function_logging
from dagster_gcf_pipes.function.session import Handler, SessionOutcome, run_session
from dagster_gcf_pipes.shared.pubsub import subscriber_client
from dagster_gcf_pipes.shared.retry import TRANSIENT_ERRORS, transient_retry

_log = logging.getLogger(f"{LOGGER_NAME}.function.worker")  # not __name__: run as __main__ by python -m

EXIT_OK = 0
EXIT_PULL_FAILED = 1
EXIT_USAGE = 2
EXIT_ABANDONED = 3

#: Seconds each extension sets a running session's ack deadline to; renewed every quarter of it. A worker
#: killed outright (SIGKILL, node loss) has its messages redelivered within this time.
LEASE_EXTENSION = 60
#: Seconds one pull waits for messages (an empty subscription answers at this deadline). Long, not short: a
#: pull whose client deadline passes just as Pub/Sub assigns it a trigger leaves that trigger outstanding until
#: the subscription's ack deadline (googleapis/google-cloud-python#8087); the fewer deadlines pass, the rarer
#: that is, and the maintainers advise against short pull timeouts (googleapis/python-pubsub#1414).
PULL_TIMEOUT = 60.0
#: The longest ack deadline a worker subscription should have: a trigger lost to a pull the worker gave up on
#: (that race, a worker stopped mid-pull) comes back only after it, and must still be inside the orchestrator's
#: start window (startup_timeout, 120 s by default). The worker extends a pulled message's deadline itself.
MAX_SUBSCRIPTION_ACK_DEADLINE = 60
#: Seconds an ack already being sent when the grace ends may still take (its retry budget).
ACK_BUDGET = 10.0
#: Seconds at most between two looks of the main thread at SIGTERM/SIGINT (see ``serve``).
SIGNAL_POLL = 0.5
#: Seconds before a trigger whose session could not be set up comes back: doubling from the first to the
#: last (Pub/Sub's longest ack deadline), as Eventarc retries a push delivery
RETRY_BACKOFF_MIN = 10
RETRY_BACKOFF_MAX = 600
#: failed set-ups remembered per message id (when the subscription has no dead-letter policy, whose
#: delivery_attempt would count them), the oldest forgotten first
_FAILURES_KEPT = 10_000


def retry_backoff(attempt: int) -> int:
    """Seconds before the ``attempt``-th failed set-up of a trigger is retried (1-based): drawn from the upper
    half of the doubled delay, so workers that failed together do not come back together."""
    ceiling = min(RETRY_BACKOFF_MIN * 2 ** min(attempt - 1, 16), RETRY_BACKOFF_MAX)
    return random.randint(ceiling // 2, ceiling)


def load_handler(target: str) -> Handler:
    """``module:attr`` naming a business handler ``(pipes, payload)`` or a ``@pipes_function`` entry point."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--target {target!r} must be module:attribute, e.g. main:main")
    sys.path.insert(0, os.getcwd())
    found = getattr(importlib.import_module(module_name), attr, None)
    if found is None:
        raise ValueError(f"--target {target!r}: module {module_name} has no attribute {attr!r}")
    return getattr(found, "pipes_handler", found)


def subscription_path(subscription: str) -> str:
    if subscription.startswith("projects/"):
        return subscription
    project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    if not project:
        raise ValueError(f"--subscription {subscription!r} is a short name: set GOOGLE_CLOUD_PROJECT or pass projects/P/subscriptions/S")
    return f"projects/{project}/subscriptions/{subscription}"


@transient_retry(max_seconds=300, max_attempts=200)
def _pull(subscriber: pubsub_v1.SubscriberClient, subscription: str, max_messages: int) -> list[Any]:
    """Up to ``max_messages`` received messages; none if nothing arrived within ``PULL_TIMEOUT``."""
    try:
        response = subscriber.pull(
            request={"subscription": subscription, "max_messages": max_messages}, timeout=PULL_TIMEOUT, retry=None
        )
    except gexc.DeadlineExceeded:
        return []
    return list(response.received_messages)


@transient_retry(max_seconds=ACK_BUDGET)
def _acknowledge(subscriber: pubsub_v1.SubscriberClient, subscription: str, ack_id: str) -> None:
    subscriber.acknowledge(request={"subscription": subscription, "ack_ids": [ack_id]}, retry=None, timeout=5)


@transient_retry(max_seconds=LEASE_EXTENSION / 4)
def _set_deadline(subscriber: pubsub_v1.SubscriberClient, subscription: str, ack_ids: list[str], seconds: int) -> None:
    """Extend the messages' ack deadlines to ``seconds`` from now; 0 hands them back (a nack)."""
    subscriber.modify_ack_deadline(
        request={"subscription": subscription, "ack_ids": ack_ids, "ack_deadline_seconds": seconds}, retry=None, timeout=5
    )


@dataclass
class _Lease:
    """A message this worker holds: its session is running, or its ack is being sent (``settling``)."""

    message_id: str
    pulled_at: float
    settling: bool = False
    abandoned: bool = False
    overdue: bool = False  # held past --max-lease-duration: no longer extended


class Worker:
    def __init__(self, handler: Handler, subscription: str, *, max_sessions: int, max_lease_duration: float):
        self._handler = handler
        self._subscription = subscription
        self._max_sessions = max_sessions
        self._max_lease_duration = max_lease_duration
        self._subscriber = subscriber_client()  # on the emulator, a channel without gRPC's 4 MiB receive limit
        self._leases: dict[str, _Lease] = {}  # by ack id
        self._lock = threading.Condition()
        self._stopping = False
        self._closed = threading.Event()
        self._pull_error: BaseException | None = None
        self._failures: dict[str, int] = {}  # message id -> failed set-ups so far (insertion order: oldest first)
        self.sessions_run = 0

    def serve(self, stop: threading.Event, shutdown_grace: float) -> int:
        """Pull until ``stop`` is set (or pulling fails); then shut down, giving running sessions
        ``shutdown_grace`` seconds. Returns the exit code (see the module docstring)."""
        self._check_ack_deadline()
        threading.Thread(target=self._pull_loop, args=(stop,), name="pipes-pull", daemon=True).start()
        threading.Thread(target=self._lease_loop, name="pipes-lease", daemon=True).start()
        _log.info("pulling %s (at most %d sessions at once)", self._subscription, self._max_sessions)
        # Never an untimed wait: the kernel may hand SIGTERM to any thread of the process (a session's, gRPC's),
        # and Python runs the handler in the main thread only once that runs Python code again; a main thread
        # asleep in stop.wait() was never woken, and the worker ran on (python/cpython#85300).
        while not stop.wait(SIGNAL_POLL):
            pass
        abandoned = self._shut_down(shutdown_grace)
        if self._pull_error is not None:
            return EXIT_PULL_FAILED
        if abandoned:
            return EXIT_ABANDONED
        _log.info("stopped after %d session(s)", self.sessions_run)
        return EXIT_OK

    def _check_ack_deadline(self) -> None:
        """Warn once at start about an ack deadline a lost trigger could not come back within (one
        GetSubscription; a worker that may not read its subscription's settings says so and goes on)."""
        try:
            found = self._subscriber.get_subscription(request={"subscription": self._subscription}, retry=None, timeout=10)
        except gexc.GoogleAPICallError as exc:
            _log.info("could not read %s's ack deadline (%s); it should be at most %d s",
                      self._subscription, exc, MAX_SUBSCRIPTION_ACK_DEADLINE)
            return
        if found.ack_deadline_seconds > MAX_SUBSCRIPTION_ACK_DEADLINE:
            _log.warning(
                "%s has an ack deadline of %d s: a trigger assigned to a pull this worker gave up on (a network blip, "
                "a worker stopped mid-pull) comes back only after it, past the orchestrator's start window "
                "(startup_timeout, 120 s by default), and its step fails. The worker extends the deadline of what it "
                "runs itself: set it to %d s or less (gcloud pubsub subscriptions update %s --ack-deadline %d)",
                self._subscription, found.ack_deadline_seconds, MAX_SUBSCRIPTION_ACK_DEADLINE,
                self._subscription.rsplit("/", 1)[-1], MAX_SUBSCRIPTION_ACK_DEADLINE,
            )

    # -- pulling: only into free slots ---------------------------------------------------------------------

    def _free_slots(self) -> int:
        """Block until a slot is free; 0 once the worker is stopping."""
        with self._lock:
            self._lock.wait_for(lambda: self._stopping or len(self._leases) < self._max_sessions)
            return 0 if self._stopping else self._max_sessions - len(self._leases)

    def _pull_loop(self, stop: threading.Event) -> None:
        try:
            while free := self._free_slots():
                for received in _pull(self._subscriber, self._subscription, free):
                    self._start(received)
        except Exception as exc:  # noqa: BLE001 - any failure ends the worker; during shutdown it is expected
            if not self._closed.is_set():
                self._pull_error = exc
                _log.error(
                    "pulling %s failed: %r. Check that the subscription exists (gcloud pubsub subscriptions create "
                    "NAME --topic TRIGGER_TOPIC --ack-deadline 60 --expiration-period never) and that the worker's "
                    "identity has roles/pubsub.subscriber on it",
                    self._subscription, exc,
                )
                stop.set()

    def _start(self, received: Any) -> None:
        message_id = received.message.message_id
        with self._lock:
            accepted = not self._stopping
            if accepted:
                self._leases[received.ack_id] = _Lease(message_id, time.monotonic())
        if not accepted:  # pulled while stopping: another worker takes it
            self._hand_back([received.ack_id], f"trigger message {message_id} arrived while stopping")
            return
        self._extend([received.ack_id])  # at once: the subscription's own ack deadline may be short
        threading.Thread(target=self._run, args=(received,), name=f"pipes-session-{message_id}", daemon=True).start()

    # -- one session ---------------------------------------------------------------------------------------

    def _run(self, received: Any) -> None:
        message = received.message
        outcome: SessionOutcome | BaseException
        try:
            # the start window is counted from Pub/Sub's publish time, never from this machine's clock
            outcome = run_session(self._handler, message.data, dict(message.attributes), message_id=message.message_id,
                                  publish_time=message.publish_time.timestamp())
        except Exception as exc:  # noqa: BLE001 - what a redelivery may fix (run_session's contract): back off
            outcome = exc
        try:
            if self._begin_settling(received.ack_id):
                self._settle(received, outcome)
        finally:
            with self._lock:
                self._leases.pop(received.ack_id, None)
                self._lock.notify_all()

    def _begin_settling(self, ack_id: str) -> bool:
        """Whether this session's message is still this worker's to ack or nack (not abandoned)."""
        with self._lock:
            lease = self._leases[ack_id]
            if lease.abandoned:
                _log.warning("trigger message %s: its session ended after the shutdown grace; the message was "
                             "already handed back unacked and stays so", lease.message_id)
                return False
            lease.settling = True
            return True

    def _settle(self, received: Any, outcome: SessionOutcome | BaseException) -> None:
        message_id = received.message.message_id
        if isinstance(outcome, BaseException):
            self._back_off(received, outcome)
            return
        with self._lock:
            self._failures.pop(message_id, None)
        try:
            _acknowledge(self._subscriber, self._subscription, received.ack_id)
        except Exception as exc:  # noqa: BLE001 - the session is over either way; a redelivery meets its lease
            _log.error("trigger message %s (session %s): the ack failed (%r); Pub/Sub will redeliver it and the "
                       "session lease absorbs the duplicate", message_id, outcome.session_id, exc)
            return
        with self._lock:
            self.sessions_run += outcome.ran
        _log.info("trigger message %s acked (session %s, ran=%s)", message_id, outcome.session_id, outcome.ran)

    def _back_off(self, received: Any, error: BaseException) -> None:
        """Hand the message back to come again after ``retry_backoff``: a failure that may pass (an outage, a
        permission being granted) is retried, never in a tight loop."""
        message_id = received.message.message_id
        with self._lock:
            attempt = received.delivery_attempt or self._failures.get(message_id, 0) + 1
            self._failures.pop(message_id, None)
            self._failures[message_id] = attempt
            if len(self._failures) > _FAILURES_KEPT:
                del self._failures[next(iter(self._failures))]
        delay = retry_backoff(attempt)
        foreseen = isinstance(error, (gexc.GoogleAPIError, *TRANSIENT_ERRORS))  # an unforeseen one shows its stack
        _log.warning("trigger message %s: the session could not be set up (attempt %d): %r; handed back, to come "
                     "again in %ds", message_id, attempt, error, delay, exc_info=None if foreseen else error)
        try:
            _set_deadline(self._subscriber, self._subscription, [received.ack_id], delay)
        except Exception as exc:  # noqa: BLE001 - its ack deadline (extended to LEASE_EXTENSION) lapses instead
            _log.warning("trigger message %s: setting its retry delay failed (%r): it comes again when its ack "
                         "deadline lapses", message_id, exc)

    # -- leases ------------------------------------------------------------------------------------------

    def _lease_loop(self) -> None:
        while not self._closed.wait(LEASE_EXTENSION / 4):
            self._extend(self._to_extend())

    def _to_extend(self) -> list[str]:
        """Ack ids of the messages still held and still within ``--max-lease-duration``."""
        now = time.monotonic()
        with self._lock:
            for lease in self._leases.values():
                if not lease.overdue and now - lease.pulled_at > self._max_lease_duration:
                    lease.overdue = True
                    _log.warning("trigger message %s: held longer than --max-lease-duration (%gs); no longer extended, "
                                 "so Pub/Sub redelivers it (the session lease absorbs the duplicate)",
                                 lease.message_id, self._max_lease_duration)
            return [ack_id for ack_id, lease in self._leases.items() if not (lease.abandoned or lease.overdue)]

    def _extend(self, ack_ids: list[str]) -> None:
        if not ack_ids:
            return
        try:
            _set_deadline(self._subscriber, self._subscription, ack_ids, LEASE_EXTENSION)
        except Exception as exc:  # noqa: BLE001 - tried again at the next renewal, well before the deadline
            if not self._closed.is_set():
                _log.warning("extending the ack deadline of %d message(s) failed: %r", len(ack_ids), exc)

    def _hand_back(self, ack_ids: list[str], why: str) -> None:
        try:
            _set_deadline(self._subscriber, self._subscription, ack_ids, 0)
        except Exception as exc:  # noqa: BLE001 - the ack deadline lapses instead
            _log.warning("%s; the nack failed (%r): Pub/Sub redelivers it when its ack deadline lapses", why, exc)
        else:
            _log.info("%s; handed back (nacked) for redelivery", why)

    # -- shutdown ----------------------------------------------------------------------------------------

    def _shut_down(self, grace: float) -> bool:
        """Stop pulling, wait up to ``grace`` for running sessions, abandon the rest. Whether any was abandoned."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            _log.info("stopping: no new sessions; waiting up to %gs for %d running session(s)", grace, len(self._leases))
            self._lock.wait_for(lambda: not self._leases, timeout=grace)
            abandoned = {ack_id: lease for ack_id, lease in self._leases.items() if not lease.settling}
            for lease in abandoned.values():
                lease.abandoned = True
        if abandoned:
            ids = ", ".join(lease.message_id for lease in abandoned.values())
            _log.error("%d session(s) still running after the %gs grace: abandoned, never to be acked (trigger "
                       "message(s) %s); the orchestrator's heartbeat timeout reports them", len(abandoned), grace, ids)
            self._hand_back(list(abandoned), f"abandoned trigger message(s) {ids}")
        with self._lock:  # acks already being sent finish (bounded by their retry budget)
            self._lock.wait_for(lambda: all(lease.abandoned for lease in self._leases.values()), timeout=ACK_BUDGET + 5)
        self._closed.set()
        self._subscriber.close()
        return bool(abandoned)


def main(argv: list[str] | None = None, prog: str = "python -m dagster_gcf_pipes.function.worker") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscription", required=True, help="pull subscription on the trigger topic (name or full path)")
    parser.add_argument("--target", required=True, help="module:attribute of the handler or @pipes_function entry point")
    parser.add_argument("--max-sessions", type=int, default=1,
                        help="sessions run at once; the worker never holds more trigger messages than this. Default 1")
    parser.add_argument("--max-lease-duration", type=float, default=24 * 3600,
                        help="seconds the worker keeps extending a message's ack deadline while its session runs")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="seconds running sessions get to end after SIGTERM/SIGINT; then they are abandoned")
    args = parser.parse_args(argv)
    if args.max_sessions < 1:
        parser.error(f"--max-sessions {args.max_sessions} must be at least 1")
    try:
        handler, subscription = load_handler(args.target), subscription_path(args.subscription)
    except ValueError as exc:
        parser.error(str(exc))
    configure_function_logging()
    worker = Worker(handler, subscription, max_sessions=args.max_sessions, max_lease_duration=args.max_lease_duration)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    code = worker.serve(stop, args.shutdown_grace)
    if code == EXIT_ABANDONED:
        # An abandoned handler may hold threads the interpreter would wait for at exit (a library's
        # executor, a thread started non-daemon): leave without joining any of them.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
