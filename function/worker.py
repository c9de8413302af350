"""The pull worker: the same trigger messages and the same decorated handler, without a time limit.

    gcf-pipes worker --subscription pipes-trigger-worker --target main:main
    python -m dagster_gcf_pipes.function.worker --subscription pipes-trigger-worker --target main:main

Event-driven Cloud Functions stop at their timeout (9 minutes at most) and a push subscription redelivers
a message whose request outlives its ack deadline. This worker pulls the trigger topic's messages instead
(streaming pull with flow control) and lets the client library keep extending each message's lease while
its session runs, up to ``--max-lease-duration``; it acks when the session has ended. Run it wherever
long work belongs: Cloud Run jobs or services, GKE, a VM.

What is acked when:
* the session ran (the handler returned, or raised and the error reached Dagster through ``closed``): ack;
* the trigger cannot run (malformed, past its start deadline, its lease held by another attempt): ack,
  since a redelivery could never help (the reason is logged);
* the session could not be set up (``run_session`` itself raised, e.g. Cloud Storage unreachable while
  taking the lease): nack, so Pub/Sub redelivers it to this or another worker.

On SIGTERM or SIGINT the worker starts no new session (messages still delivered are handed back at once)
and gives running sessions ``--shutdown-grace`` seconds to end, their leases still extended; their
messages are acked as above, then the stream is closed. A session still running after the grace is abandoned when the
process exits: its message is not acked, and the orchestrator's heartbeat timeout reports it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

from dagster_gcf_pipes.function.logs import LOGGER_NAME, configure_function_logging
from dagster_gcf_pipes.function.session import Handler, run_session

_log = logging.getLogger(f"{LOGGER_NAME}.worker")


def load_handler(target: str) -> Handler:
    """``module:attr`` naming a business handler ``(pipes, payload)`` or a ``@pipes_function`` entry point."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--target {target!r} must be module:attribute, e.g. main:main")
    sys.path.insert(0, os.getcwd())
    found = getattr(importlib.import_module(module_name), attr, None)
    if found is None:
        raise SystemExit(f"--target {target!r}: module {module_name} has no attribute {attr!r}")
    return getattr(found, "pipes_handler", found)


def subscription_path(subscription: str) -> str:
    if subscription.startswith("projects/"):
        return subscription
    project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    if not project:
        raise SystemExit(f"--subscription {subscription!r} is a short name: set GOOGLE_CLOUD_PROJECT or pass projects/P/subscriptions/S")
    return f"projects/{project}/subscriptions/{subscription}"


class Worker:
    def __init__(self, handler: Handler, subscription: str, *, max_messages: int, max_lease_duration: float):
        self._handler = handler
        self._subscription = subscription
        self._max_messages = max_messages
        self._max_lease_duration = max_lease_duration
        self._running = 0
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self.sessions_run = 0

    def _on_message(self, message: Any) -> None:
        with self._lock:
            if self._stopping.is_set():  # shutting down: another worker takes it
                message.nack()
                return
            self._running += 1
        try:
            outcome = run_session(self._handler, message.data, dict(message.attributes), message_id=message.message_id,
                                  publish_time=message.publish_time.timestamp())
        except Exception:  # noqa: BLE001 - setting the session up failed: let Pub/Sub redeliver it
            _log.exception("trigger message %s: the session could not be set up; nacked for redelivery", message.message_id)
            message.nack()
        else:
            message.ack()
            if outcome.ran:
                self.sessions_run += 1
            _log.info("trigger message %s acked (session %s, ran=%s)", message.message_id, outcome.session_id, outcome.ran)
        finally:
            with self._lock:
                self._running -= 1
                self._lock.notify_all()

    def serve(self, stop: threading.Event, shutdown_grace: float) -> int:
        """Pull until ``stop`` is set; then let running sessions end for up to ``shutdown_grace`` seconds."""
        subscriber = pubsub_v1.SubscriberClient()
        flow_control = pubsub_v1.types.FlowControl(
            max_messages=self._max_messages, max_lease_duration=self._max_lease_duration
        )
        executor = ThreadPoolExecutor(max_workers=self._max_messages, thread_name_prefix="pipes-session")
        streaming = subscriber.subscribe(
            self._subscription, self._on_message, flow_control=flow_control,
            scheduler=ThreadScheduler(executor),
        )
        _log.info("pulling %s (at most %d sessions at once)", self._subscription, self._max_messages)
        while not stop.wait(0.5):
            if streaming.done():
                _log.error("the streaming pull of %s ended: %r", self._subscription, streaming.exception())
                return 1
        _log.info("stopping: no new sessions; waiting up to %gs for %d running session(s)", shutdown_grace, self._running)
        # The stream stays open until running sessions end: it keeps extending their leases and carries
        # their acks. Messages delivered meanwhile are handed back at once.
        with self._lock:
            self._stopping.set()
            finished = self._lock.wait_for(lambda: self._running == 0, timeout=shutdown_grace)
        streaming.cancel()
        if not finished:
            _log.error("%d session(s) still running after the grace period; their messages stay unacked", self._running)
            return 1
        subscriber.close()
        _log.info("stopped after %d session(s)", self.sessions_run)
        return 0


def main(argv: list[str] | None = None, prog: str = "python -m dagster_gcf_pipes.function.worker") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscription", required=True, help="pull subscription on the trigger topic (name or full path)")
    parser.add_argument("--target", required=True, help="module:attribute of the handler or @pipes_function entry point")
    parser.add_argument("--max-messages", type=int, default=1, help="sessions run at once (flow control); default 1")
    parser.add_argument("--max-lease-duration", type=float, default=24 * 3600,
                        help="seconds the library keeps extending a message's lease while its session runs")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="seconds running sessions get to end after SIGTERM/SIGINT")
    args = parser.parse_args(argv)
    configure_function_logging()
    worker = Worker(load_handler(args.target), subscription_path(args.subscription),
                    max_messages=args.max_messages, max_lease_duration=args.max_lease_duration)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return worker.serve(stop, args.shutdown_grace)


if __name__ == "__main__":
    sys.exit(main())
