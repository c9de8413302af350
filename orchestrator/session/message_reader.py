"""The Pipes message reader: one session's replies, read from Pub/Sub (``reply_subscription.py`` says
through which subscription: the session's own, or its fan-out group's).

Messages arrive by streaming pull; each is decoded (claim-check objects fetched from GCS), checked for the
session id (the Pub/Sub emulator stores filters but does not apply them, so this check is what isolates
sessions there), reassembled into order and handed to Dagster's handler, then acked. Anything malformed is
logged with its message id and acked: it never reaches Dagster and never stops the reader.

What a reply may make the reader do is bounded, since anyone allowed to publish to the reply topic can
write one (docs/reliability.md, "Threat model"): a claim-check pointer is only followed inside the
session's own folder and up to ``MAX_CLAIM_BYTES``; an ``opened`` only makes its invocation the session's
owner if that invocation holds the session lease in GCS, which only the function that claimed the trigger
can have written; and a message the stream can never deliver (larger than the channel accepts) ends the
session with an error that says so, instead of stalling it until a timeout blames the function.

A reader re-attached to a session an earlier attempt of the step started (``orchestrator/session/reattach.py``)
re-opens its subscription from the start and hands Dagster every message again, except the lines
``replay`` says the earlier attempts already wrote: those are counted as handled without being written.
The owner the earlier attempts recorded (``known_invocation``) is accepted without reading the lease,
which may be a tombstone swept by then.
"""

from __future__ import annotations

import hmac
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from dagster import PipesMessageHandler, PipesMessageReader
from dagster_pipes import PipesParams
from google.cloud import pubsub_v1, storage

from dagster_gcf_pipes.orchestrator.diagnostics.errors import ReplyStreamError
from dagster_gcf_pipes.orchestrator.session.reassembly import ReassemblyError, SessionReassembler
from dagster_gcf_pipes.orchestrator.session.reattach import CLOSED_WITH_EXCEPTION_LINE, OPENED_LINE, ReplayFilter
from dagster_gcf_pipes.orchestrator.session.reply_subscription import (
    ReplyDemux,
    ReplySubscription,
    subscription_name,
    subscription_problem,
)
from dagster_gcf_pipes.orchestrator.session.wait import SessionWaiter
from dagster_gcf_pipes.orchestrator.diagnostics.tracing import hand_off
from dagster_gcf_pipes.shared.claim_check import ClaimCheck
from dagster_gcf_pipes.shared.layout import lease_key, session_prefix
from dagster_gcf_pipes.shared.lease import fetch_lease, read_lease
from dagster_gcf_pipes.shared.protocol import (
    OWNER_TOKEN_EXTRA,
    Attr,
    ProtocolError,
    Reply,
    ReplyChannelParams,
    require_session_id,
    subscription_filter,
)
from dagster_gcf_pipes.shared.pubsub import forget_stream, stream_trouble, undeliverable_hint
from dagster_gcf_pipes.shared.signing import is_authentic
from dagster_gcf_pipes.shared.tracing import current_context


def decode_reply(
    data: bytes,
    attributes: Mapping[str, str],
    claim_check: ClaimCheck,
    signing_secret: str | None,
    *,
    bucket: str,
    prefix: str,
) -> Reply:
    """One reply message as published by the function's writer: fetched from GCS if claim-checked (only from
    its session's folder ``gs://bucket/prefix/SESSION/``), its signature checked when a secret is
    configured, decoded. Raises ``ProtocolError`` for anything malformed."""
    session_folder = f"gs://{bucket}/{session_prefix(prefix, require_session_id(attributes))}"
    body = claim_check.unwrap(data, attributes, within=session_folder)
    if signing_secret and not is_authentic(signing_secret, body, attributes):
        raise ProtocolError(
            f"unsigned or badly signed reply of invocation {attributes.get(Attr.INVOCATION)!r}; "
            "the function must have the orchestrator's signing secret"
        )
    return Reply.decode(body, attributes)


def _opened_extras(reply: Reply) -> Mapping[str, Any]:
    """The extras of the ``opened`` that starts this batch 0 (empty if it does not start with one)."""
    first = reply.messages[0] if reply.messages else {}
    params = first.get("params") if first.get("method") == "opened" else None
    extras = params.get("extras") if isinstance(params, Mapping) else None
    return extras if isinstance(extras, Mapping) else {}


def _seq_of(attributes: Mapping[str, str]) -> int | None:
    """A reply's ``seq`` attribute, if it is a plain number (anything else is left to ``Reply.decode``)."""
    seq = attributes.get(Attr.SEQ, "")
    return int(seq) if seq.isascii() and seq.isdigit() else None


def with_log_prefix(pipes_message: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """The message with ``prefix`` before its text if it is a log line, or before each line of printed text,
    an unfinished last line ended (how fan-out tells shards apart)."""
    method = pipes_message.get("method")
    if not prefix or method not in ("log", "log_external_stream"):
        return pipes_message
    params = pipes_message.get("params")
    if not isinstance(params, Mapping):
        return pipes_message  # malformed: Dagster's handler reports it as it is
    if method == "log":
        if not isinstance(params.get("message"), str):
            return pipes_message
        return {**pipes_message, "params": {**params, "message": f"{prefix}{params['message']}"}}
    text = params.get("text") if isinstance(params, Mapping) else None
    if not isinstance(text, str):
        return pipes_message  # malformed: Dagster's handler reports it as it is
    # each piece ends its line, or another shard's next line would follow on from an unfinished one
    prefixed = "".join(prefix + (line if line.endswith(("\n", "\r")) else line + "\n") for line in text.splitlines(True))
    return {**pipes_message, "params": {**params, "text": prefixed}}


def dagster_line(pipes_message: Mapping[str, Any]) -> str | None:
    """The text of the line Dagster's handler writes into the event log for this message, if it writes one."""
    method, params = pipes_message.get("method"), pipes_message.get("params") or {}
    if method == "opened":
        return OPENED_LINE
    if method == "log" and isinstance(params, Mapping):
        return str(params.get("message"))
    if method == "closed" and isinstance(params, Mapping) and params.get("exception"):
        return CLOSED_WITH_EXCEPTION_LINE
    return None


def _count_as_handled(handler: PipesMessageHandler, pipes_message: Mapping[str, Any], reader: PipesMessageReader) -> bool:
    """Account for a message whose line an earlier attempt already wrote, without writing it again: a log
    line needs nothing; ``opened`` and ``closed`` are counted as Dagster's handler counts them (its
    counters are private: if they ever change, the message is handed on and its line written again)."""
    method = pipes_message.get("method")
    if method == "log":
        return True
    counter = {"opened": "_opened_count", "closed": "_closed_count"}.get(str(method))
    if counter is None or not isinstance(getattr(handler, counter, None), int):
        return False
    setattr(handler, counter, getattr(handler, counter) + 1)
    if method == "opened":
        reader.on_opened(pipes_message.get("params") or {})  # type: ignore[arg-type]
    return True


class PipesPubSubMessageReader(SessionWaiter, PipesMessageReader):
    def __init__(
        self,
        *,
        subscriber: pubsub_v1.SubscriberClient | None,
        claim_check: ClaimCheck,
        gcs: storage.Client,
        channel_params: ReplyChannelParams,
        log: logging.Logger | Any | None = None,
        signing_secret: str | None = None,
        log_prefix: str = "",
        demux: ReplyDemux | None = None,
        retain: bool = False,
        replay: ReplayFilter | None = None,
        replay_from: Sequence[str] = (),
        known_invocation: str | None = None,
        on_owner: Callable[[str], None] | None = None,
        create_budget_seconds: float = 60.0,
        quiet_opened: bool = False,
    ):
        """Reads through a subscription of its own (``subscriber``) or, in a fan-out group, through ``demux``.

        ``retain``: the subscription keeps acknowledged replies. ``replay``: re-attached to an existing
        session, whose earlier subscriptions (``replay_from``) are read again from the start. ``on_owner(invocation_id)`` is called when
        an invocation's ``opened`` is accepted, before it is handed on. ``quiet_opened`` (a fan-out's shards):
        ``opened`` is counted as Dagster's handler counts it but its line is not written; the fan-out's
        progress lines count the shards, as they do instead of a line per shard for every other shard event."""
        self._subscriber = subscriber
        self._demux = demux
        self._claim_check = claim_check
        self._gcs = gcs
        #: the session lease as read when its owner's ``opened`` was accepted (``end_lease`` writes the
        #: tombstone over this generation without reading it again; a lease renewed since is read again)
        self.lease_read: storage.Blob | None = None
        self._channel_params = channel_params
        self.session_id = channel_params.session_id
        self._log = log or logging.getLogger(__name__)
        self._signing_secret = signing_secret
        self._log_prefix = log_prefix
        self._cond = threading.Condition()
        self._reassembler = SessionReassembler(self.session_id, warn=self._log.warning)
        self._handler: PipesMessageHandler | None = None
        self._subscription: ReplySubscription | None = None
        self._failure: BaseException | None = None
        self._trace_parent = current_context()  # the session's span (built in it), when tracing is on
        self._retain = retain
        self._replay = replay
        self._replay_from = list(replay_from)
        self._name = subscription_name(self.session_id, reattaching=bool(replay_from))
        self._known_invocation = known_invocation
        self._on_owner = on_owner
        self._create_budget_seconds = create_budget_seconds
        self._quiet_opened = quiet_opened

    # ---------------------------------------------------------------- PipesMessageReader
    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[PipesParams]:
        self._handler = handler
        source: AbstractContextManager[ReplySubscription]
        if self._demux is not None:
            source = self._demux.route(self.session_id, self._on_message)
        else:
            source = ReplySubscription(
                self._subscriber,
                topic=self._channel_params.topic,
                name=self._name,
                filter=subscription_filter(self.session_id),
                on_message=self._on_message,
                log=self._log,
                retain=self._retain,
                replay_from=self._replay_from,
                create_budget_seconds=self._create_budget_seconds,
            )
        with source as subscription:
            self._subscription = subscription
            try:
                yield self._channel_params.to_params()
            finally:
                if self._demux is None:
                    forget_stream(subscription.path)

    @property
    def subscription_path(self) -> str:
        """The subscription the replies come through (the fan-out group's, in a group)."""
        if self._demux is not None:
            return self._demux.subscription_path
        assert self._subscriber is not None
        return self._subscriber.subscription_path(self._channel_params.topic.split("/")[1], self._name)

    @property
    def subscription_paths(self) -> list[str]:
        """Every subscription this session's replies are kept in: what a later attempt replays."""
        if self._demux is not None:
            return self._demux.subscription_paths
        return [*self._replay_from, self.subscription_path]

    def no_messages_debug_text(self) -> str:
        return (
            f"Attempted to read replies of session {self.session_id} from {self._channel_params.topic} through "
            f"subscription {self._subscription.path if self._subscription else '(none)'}. Expected the function to be decorated with @pipes_function "
            "(or to open Pipes with PubSubMessageWriter)."
        )

    # ---------------------------------------------------------------- the streaming-pull callback
    def _on_message(self, message: pubsub_v1.subscriber.message.Message) -> None:
        try:
            with hand_off(self._trace_parent, message.attributes, message.message_id):
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
        with self._cond:
            if self._reassembler.already_taken(attributes.get(Attr.INVOCATION), _seq_of(attributes)):
                self._reassembler.duplicates_dropped += 1
                return
        params = self._channel_params
        reply = decode_reply(
            message.data, attributes, self._claim_check, self._signing_secret, bucket=params.bucket, prefix=params.prefix
        )
        if reply.seq == 0 and not self.opened and not self._may_open(reply):
            raise ProtocolError(
                f"'opened' of invocation {reply.invocation_id}, which neither echoes the trigger's owner token nor "
                "holds the session lease "
                f"gs://{params.bucket}/{lease_key(params.prefix, self.session_id)}: not from the function that "
                "claimed the trigger (forged, or a stray publisher on the reply topic); ignored"
            )
        with self._cond:
            if self._reassembler.counts_as_alive(reply):
                self._heard_from_function()
            was_opened = self.opened
            released = self._reassembler.offer(reply)
            if self.opened and not was_opened and self._on_owner is not None and reply.invocation_id != self._known_invocation:
                self._on_owner(reply.invocation_id)
            for pipes_message in released:
                self._hand_to_dagster(pipes_message)
            self._cond.notify_all()

    def _may_open(self, reply: Reply) -> bool:
        """Whether the invocation of this batch 0 may own the session: the one the earlier attempts recorded,
        or one whose ``opened`` echoes the trigger's owner token (which only the trigger carried), or else
        (a function of an earlier release; a re-attached reader, which holds a token of its own) one the
        session lease names."""
        if reply.invocation_id == self._known_invocation:
            return True
        token = _opened_extras(reply).get(OWNER_TOKEN_EXTRA)
        expected = self._channel_params.owner_token
        if isinstance(token, str) and expected and hmac.compare_digest(token.encode(), expected.encode()):
            return True
        return self._holds_lease(reply.invocation_id)

    def _holds_lease(self, invocation_id: str) -> bool:
        """Whether the session lease names ``invocation_id``: a function claims it before sending ``opened``,
        and writing it takes write access to the bucket, which publishing a reply does not."""
        params = self._channel_params
        lease = fetch_lease(self._gcs, params.bucket, lease_key(params.prefix, self.session_id))
        if lease is None or read_lease(lease).invocation_id != invocation_id:
            return False
        self.lease_read = lease
        return True

    def _hand_to_dagster(self, pipes_message: Mapping[str, Any]) -> None:
        assert self._handler is not None
        pipes_message = with_log_prefix(pipes_message, self._log_prefix)
        line = dagster_line(pipes_message)
        if self._quiet_opened and line == OPENED_LINE and _count_as_handled(self._handler, pipes_message, self):
            return
        replayed = self._replay is not None and line is not None and self._replay.already_recorded(line)
        if replayed and _count_as_handled(self._handler, pipes_message, self):
            return
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
        stopped = self._subscription.stopped() if self._subscription is not None else None
        if stopped:
            raise ReplyStreamError(f"session {self.session_id}: {stopped}")
        trouble = stream_trouble(self._subscription.path) if self._subscription is not None else None
        if trouble is not None and trouble.undeliverable:
            raise ReplyStreamError(f"session {self.session_id}: {undeliverable_hint(trouble.subscription, trouble.error)}")

    def _channel_problem(self) -> str | None:
        """Ask Pub/Sub about the reply subscription (one GetSubscription, only when a timeout is being raised)."""
        if self._subscription is None:
            return None
        return subscription_problem(self._subscriber or self._demux_subscriber(), self._subscription.path)

    def _demux_subscriber(self) -> pubsub_v1.SubscriberClient:
        assert self._demux is not None
        return self._demux.subscriber

    def _stream_trouble_since(self, since: float) -> str | None:
        trouble = stream_trouble(self._subscription.path) if self._subscription is not None else None
        return trouble.describe() if trouble is not None and trouble.last_at >= since else None
