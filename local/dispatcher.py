"""Eventarc-like delivery for the local stack: pull a function's trigger subscription and POST each message to
the Functions Framework as Eventarc does, with up to ``concurrency`` deliveries in flight.

The emulator's push subscriptions deliver at most 2 messages at a time, so a local fan-out ran 2 shards at a
time whatever its ``max_concurrency`` said. Eventarc scales instances up to ``--max-instances``; this process
plays that part. Run by ``LocalStack`` (one per trigger function, in its own process so that it competes
with neither the orchestrator's GIL nor its thread count)::

    python -m dagster_gcf_pipes.local.dispatcher --subscription projects/P/subscriptions/S \\
        --topic projects/P/topics/T --url http://127.0.0.1:PORT/ --concurrency 100

Delivery follows the push subscription it replaces:

- **Body and headers**: a binary-mode CloudEvent ``google.cloud.pubsub.topic.v1.messagePublished``: the body
  is the Pub/Sub push body ``{"message": {...}, "subscription": ...}`` and the ``ce-*`` headers carry the
  event's id (the message id), source (the topic), type and time (the publish time). A ``traceparent`` (or the
  client library's ``googclient_traceparent``) message attribute goes out as ``traceparent`` and
  ``ce-traceparent``, as Eventarc propagates trace context.
- **Ack deadline**: messages are pulled, not streamed, so nothing extends their lease: a function that outlives
  the subscription's ack deadline is redelivered while it runs, as with push (and in production).
- **Answers**: a 2xx acks the message. Anything else, or no answer at all, leaves it for a retry after a
  backoff that doubles from ``RETRY_MIN_SECONDS`` to ``RETRY_MAX_SECONDS`` (Eventarc: 10 s to 600 s;
  shorter here, for quick local feedback). A function server that refuses connections is logged loudly, with
  its log file, since it is most likely dead. The first error answer after a success (or at start) is logged
  loudly too (``FUNCTION_FAILED``), with the end of the function's log: a ``@pipes_function`` answers 2xx
  even when the handler raises (Dagster gets the error), so an error answer means the function failed
  outside its session (an entry point that is not a ``@pipes_function``, a crash at import), which a waiting
  run would otherwise only see as its startup timeout. ``gcf-pipes up``/``dev`` show these lines.
- **Concurrency**: a slot is taken before a message is pulled and given back when its POST answers, so at most
  ``concurrency`` functions run at once and the rest wait in the subscription, as they wait for an instance.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1.types import ReceivedMessage

from dagster_gcf_pipes.local.local_stack import log_tail
from dagster_gcf_pipes.shared.pubsub import subscriber_client

EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"
RETRY_MIN_SECONDS = 1
RETRY_MAX_SECONDS = 60
#: how long one POST may take: the longest a 2nd-gen event-driven function may run
REQUEST_TIMEOUT_SECONDS = 3600
PULL_RETRY_SECONDS = 1.0
#: the most messages one pull may ask for (Pub/Sub's limit)
MAX_PULL = 1000
#: the message attributes a trace context may arrive in, first match wins
TRACEPARENT_ATTRIBUTES = ("traceparent", "googclient_traceparent")

#: starts the line that reports a function failing its deliveries (``gcf-pipes up``/``dev`` look for it)
FUNCTION_FAILED = "THE FUNCTION FAILED"
#: how much of the function's log such a report quotes
LOG_LINES = 20

_log = logging.getLogger("dagster_gcf_pipes.local.dispatcher")


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


def retry_delay(attempt: int) -> int:
    """Seconds before the ``attempt``-th failed delivery of a message is retried (1-based)."""
    return min(RETRY_MIN_SECONDS * 2 ** min(attempt - 1, 16), RETRY_MAX_SECONDS)


@dataclass
class Dispatcher:
    subscription: str
    topic: str
    url: str
    concurrency: int
    #: where the function server logs, named when it refuses connections
    function_log: str = ""
    #: no receive limit on the emulator's channel, as on production channels: a trigger up to Pub/Sub's 10 MB
    subscriber: pubsub_v1.SubscriberClient = field(default_factory=subscriber_client)
    _failures: dict[str, int] = field(default_factory=dict)  # message id -> failed deliveries so far
    #: the last answer was an error: the next ones are not reported loudly again until a delivery succeeds
    _failing: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        """Deliver until the process is stopped or the subscription is deleted."""
        slots = threading.BoundedSemaphore(self.concurrency)
        _log.info("delivering %s to %s, %d at a time", self.subscription, self.url, self.concurrency)
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="deliver") as pool:
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
        while free < min(self.concurrency, MAX_PULL) and slots.acquire(blocking=False):
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
            status = self._post(message)
            self._report(message, status)
            self._settle(message, ack=200 <= status < 300)
        except Exception:  # noqa: BLE001 - a delivery must never die silently: the message is retried
            _log.exception("the delivery of message %s failed", message.message.message_id)
        finally:
            slots.release()

    def _post(self, message: ReceivedMessage) -> int:
        """POST one message; its HTTP status, or 0 when there was no answer."""
        body, headers = push_request(message, self.topic, self.subscription)
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except ConnectionRefusedError as exc:
            self._refused(exc)
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                self._refused(exc.reason)
            else:
                _log.warning("POST to %s failed: %s", self.url, exc.reason)
        except OSError as exc:
            _log.warning("POST to %s failed: %s", self.url, exc)
        return 0

    def _report(self, message: ReceivedMessage, status: int) -> None:
        """Report the first error answer (status 0, no answer, is reported where it happens)."""
        with self._lock:
            first = status >= 300 and not self._failing
            if status:
                self._failing = status >= 300
        if first:
            quoted = log_tail(Path(self.function_log), LOG_LINES) if self.function_log else "(its log is not known)"
            _log.error(
                "%s message %s of %s with HTTP %d: it failed outside its Pipes session (is its entry point a "
                "@pipes_function? does it import?), so a run waiting for it fails only at its startup_timeout. "
                "The message is retried. The end of the function's log (%s):\n%s",
                FUNCTION_FAILED, message.message.message_id, self.topic, status, self.function_log, quoted,
            )

    def _refused(self, exc: BaseException) -> None:
        _log.error(
            "THE FUNCTION SERVER IS DOWN: %s refused the connection (%s). Messages stay in %s and are retried; "
            "check the server's log%s",
            self.url, exc, self.subscription, f" ({self.function_log})" if self.function_log else "",
        )

    def _settle(self, message: ReceivedMessage, *, ack: bool) -> None:
        """Ack a delivered message, or leave it to be retried after the backoff for its failures so far."""
        message_id = message.message.message_id
        with self._lock:
            attempt = 0 if ack else self._failures.get(message_id, 0) + 1
            if attempt:
                self._failures[message_id] = attempt
            else:
                self._failures.pop(message_id, None)
        try:
            if ack:
                self.subscriber.acknowledge(subscription=self.subscription, ack_ids=[message.ack_id], timeout=30)
            else:
                delay = retry_delay(attempt)
                _log.warning("message %s was not accepted (attempt %d); retrying in %ds", message_id, attempt, delay)
                self.subscriber.modify_ack_deadline(
                    subscription=self.subscription, ack_ids=[message.ack_id], ack_deadline_seconds=delay, timeout=30
                )
        except gexc.GoogleAPICallError as exc:  # the ack deadline passed first: Pub/Sub redelivers the message
            _log.warning("settling message %s failed (it will be redelivered): %s", message_id, exc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscription", required=True, help="projects/P/subscriptions/S to pull")
    parser.add_argument("--topic", required=True, help="projects/P/topics/T, the CloudEvent's source")
    parser.add_argument("--url", required=True, help="the Functions Framework to POST to")
    parser.add_argument("--concurrency", type=int, default=100, help="deliveries in flight at most")
    parser.add_argument("--function-log", default="", help="the function server's log file, named in errors")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error(f"--concurrency={args.concurrency} must be at least 1")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Dispatcher(args.subscription, args.topic, args.url, args.concurrency, args.function_log).run()


if __name__ == "__main__":
    main()
