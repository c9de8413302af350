"""The Pipes message reader: one session's replies, read from a per-session Pub/Sub subscription.

The subscription is created on the reply topic with a filter on the session attribute **before** the
trigger is published (so no reply can be missed) and deleted when the session ends; it also carries an
expiration policy, the backstop for an orchestrator that dies without cleaning up. Messages arrive by
streaming pull; each is decoded (claim-check objects fetched from GCS), checked for the session id (the
Pub/Sub emulator stores filters but does not apply them, so this check is what isolates sessions there),
reassembled into order and handed to Dagster's handler, then acked. Anything malformed is logged with its
message id and acked: it never reaches Dagster and never stops the reader.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from dagster import PipesMessageHandler, PipesMessageReader
from dagster_pipes import PipesParams
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from orchestrator.errors import PipesPubSubConfigError, ReplyStreamError
from orchestrator.reassembly import ReassemblyError, SessionReassembler
from orchestrator.session_wait import SessionWaiter
from shared.claim_check import ClaimCheck
from shared.protocol import Attr, ProtocolError, Reply, ReplyChannelParams, subscription_filter
from shared.retry import transient_retry
from shared.signing import is_authentic

#: How long tearing a session down may wait on an unreachable Pub/Sub before leaving the subscription to
#: its expiration policy: cleanup must not hold up (or mask) the step's real outcome.
CLEANUP_BUDGET_SECONDS = 10.0

#: Pub/Sub's minimum expiration TTL: an idle per-session subscription disappears a day after its last use.
SUBSCRIPTION_TTL_SECONDS = 24 * 3600


@transient_retry()
def _create_subscription(subscriber: pubsub_v1.SubscriberClient, request: Mapping[str, Any]) -> None:
    subscriber.create_subscription(request=request)


@transient_retry(max_seconds=CLEANUP_BUDGET_SECONDS)
def _delete_subscription(subscriber: pubsub_v1.SubscriberClient, path: str) -> None:
    try:
        subscriber.delete_subscription(request={"subscription": path}, retry=None, timeout=5)
    except gexc.NotFound:
        pass


def decode_reply(data: bytes, attributes: Mapping[str, str], claim_check: ClaimCheck, signing_secret: str | None) -> Reply:
    """One reply message as published by the function's writer: fetched from GCS if claim-checked, its
    signature checked when a secret is configured, decoded. Raises ``ProtocolError`` for anything malformed."""
    body = claim_check.unwrap(data, attributes)
    if signing_secret and not is_authentic(signing_secret, body, attributes):
        raise ProtocolError(
            f"unsigned or badly signed reply of invocation {attributes.get(Attr.INVOCATION)!r}; "
            "the function must have the orchestrator's signing secret"
        )
    return Reply.decode(body, attributes)


def with_log_prefix(pipes_message: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """The message with ``prefix`` before its text if it is a log line (how fan-out tells shards apart)."""
    if not prefix or pipes_message.get("method") != "log":
        return pipes_message
    params = pipes_message["params"]
    return {**pipes_message, "params": {**params, "message": f"{prefix}{params['message']}"}}


class PipesPubSubMessageReader(SessionWaiter, PipesMessageReader):
    def __init__(
        self,
        *,
        subscriber: pubsub_v1.SubscriberClient,
        claim_check: ClaimCheck,
        channel_params: ReplyChannelParams,
        log: logging.Logger | Any | None = None,
        ack_deadline_seconds: int = 60,
        signing_secret: str | None = None,
        log_prefix: str = "",
    ):
        self._subscriber = subscriber
        self._claim_check = claim_check
        self._channel_params = channel_params
        self.session_id = channel_params.session_id
        self._log = log or logging.getLogger("dagster_pipes_gcp.reader")
        self._ack_deadline_seconds = ack_deadline_seconds
        self._signing_secret = signing_secret
        self._log_prefix = log_prefix
        project = channel_params.topic.split("/")[1]
        self.subscription_path = subscriber.subscription_path(project, f"dagster-pipes-{self.session_id}")
        self._cond = threading.Condition()
        self._reassembler = SessionReassembler(self.session_id, warn=self._log.warning)
        self._handler: PipesMessageHandler | None = None
        self._streaming: pubsub_v1.subscriber.futures.StreamingPullFuture | None = None
        self._failure: BaseException | None = None

    # ---------------------------------------------------------------- PipesMessageReader
    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[PipesParams]:
        self._handler = handler
        self._create_subscription()
        try:
            self._streaming = self._subscriber.subscribe(
                self.subscription_path,
                self._on_message,
                flow_control=pubsub_v1.types.FlowControl(max_messages=1000),
                await_callbacks_on_shutdown=True,
            )
            yield self._channel_params.to_params()
        finally:
            if self._streaming is not None:
                self._streaming.cancel()
                try:
                    self._streaming.result(timeout=CLEANUP_BUDGET_SECONDS)
                except BaseException:  # noqa: BLE001 - the stream's end is not the step's outcome
                    pass
            try:
                _delete_subscription(self._subscriber, self.subscription_path)
            except gexc.GoogleAPIError as exc:
                self._log.warning(
                    f"[pipes] could not delete {self.subscription_path} ({exc}); its expiration policy removes it "
                    f"after {SUBSCRIPTION_TTL_SECONDS // 3600} h unused"
                )

    def no_messages_debug_text(self) -> str:
        return (
            f"Attempted to read replies of session {self.session_id} from {self._channel_params.topic} through "
            f"subscription {self.subscription_path}. Expected the function to be decorated with @pipes_function "
            "(or to open Pipes with PubSubMessageWriter)."
        )

    def _create_subscription(self) -> None:
        request = {
            "name": self.subscription_path,
            "topic": self._channel_params.topic,
            "filter": subscription_filter(self.session_id),
            "ack_deadline_seconds": self._ack_deadline_seconds,
            "expiration_policy": {"ttl": {"seconds": SUBSCRIPTION_TTL_SECONDS}},
            "message_retention_duration": {"seconds": 600},
        }
        try:
            _create_subscription(self._subscriber, request)
        except gexc.NotFound as exc:
            raise PipesPubSubConfigError(
                f"reply topic {self._channel_params.topic} does not exist: create it "
                f"(gcloud pubsub topics create {self._channel_params.topic.rsplit('/', 1)[-1]}) or fix reply_topic"
            ) from exc
        except gexc.PermissionDenied as exc:
            raise PipesPubSubConfigError(
                f"not allowed to create subscription {self.subscription_path} on {self._channel_params.topic}: "
                "grant the orchestrator's service account roles/pubsub.subscriber and roles/pubsub.editor "
                f"(or a custom role with pubsub.subscriptions.create/delete) ({exc.message})"
            ) from exc

    # ---------------------------------------------------------------- the streaming-pull callback
    def _on_message(self, message: pubsub_v1.subscriber.message.Message) -> None:
        try:
            self._take(message)
        except ReassemblyError as exc:
            with self._cond:
                self._failure = exc
                self._cond.notify_all()
        except ProtocolError as exc:
            self._log.warning(f"[pipes] dropped reply message {message.message_id}: {exc}")
        except Exception:  # noqa: BLE001 - a bad message must never stop the reader
            self._log.exception(f"[pipes] failed to process reply message {message.message_id}; dropped")
        message.ack()

    def _take(self, message: pubsub_v1.subscriber.message.Message) -> None:
        attributes = dict(message.attributes)
        if attributes.get(Attr.SESSION) not in (None, self.session_id):
            return  # another session's reply: only reaches us where filters are not applied (the emulator)
        reply = decode_reply(message.data, attributes, self._claim_check, self._signing_secret)
        with self._cond:
            if self._reassembler.counts_as_alive(reply):
                self._heard_from_function()
            for pipes_message in self._reassembler.offer(reply):
                self._hand_to_dagster(pipes_message)
            self._cond.notify_all()

    def _hand_to_dagster(self, pipes_message: Mapping[str, Any]) -> None:
        assert self._handler is not None
        pipes_message = with_log_prefix(pipes_message, self._log_prefix)
        try:
            self._handler.handle_message(pipes_message)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - as dagster's own readers do: report and go on
            self._handler.report_pipes_framework_exception(
                f"{self.__class__.__name__} handling a {pipes_message.get('method')!r} message", sys.exc_info()
            )

    # ---------------------------------------------------------------- waiting for the end
    @property
    def opened(self) -> bool:
        return self._reassembler.opened

    @property
    def closed(self) -> bool:
        return self._reassembler.closed

    @property
    def closed_params(self) -> Mapping[str, Any] | None:
        return self._reassembler.closed_params

    @property
    def invocation_id(self) -> str | None:
        return self._reassembler.accepted_invocation

    def _raise_if_broken(self) -> None:
        if self._failure is not None:
            raise ReplyStreamError(f"session {self.session_id}: {self._failure}") from self._failure
        if self._streaming is not None and self._streaming.done():
            raise ReplyStreamError(
                f"session {self.session_id}: reading {self.subscription_path} stopped: "
                f"{self._streaming.exception()!r}; check that Pub/Sub is reachable and the subscription exists"
            )
