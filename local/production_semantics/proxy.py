"""The gRPC proxy: Pub/Sub's services on a loopback port, each call forwarded to the emulator byte for byte,
except the calls whose production behaviour the emulator lacks, which are parsed and changed on the way.

One ``grpc.aio`` server with a generic handler: every method of every service (Publisher, Subscriber,
SchemaService, IAMPolicy) is relayed with its metadata and its client's deadline, and an upstream error comes
back with its code and details. Intercepted:

- admin calls (everything but Publish, Pull, StreamingPull, Acknowledge, ModifyAckDeadline): metered, held to
  the quota, their response lost at ``lost_admin_response_rate``; CreateSubscription's filter is checked
  (INVALID_ARGUMENT, as Pub/Sub answers; the emulator accepts anything) and remembered; so is each
  subscription's configuration from Create/Get/UpdateSubscription;
- Publish: metered, and the topic's waiting pulls woken;
- Pull: served as Pub/Sub serves it (see ``_pull``), through ``delivery.Deliveries``;
- StreamingPull: relayed as a stream whose responses go through ``delivery.Deliveries`` and whose acks are
  screened; it ends its upstream stream when its client's ends, whichever way (see ``_Stream``);
- Acknowledge, ModifyAckDeadline: screened (late and duplicate ack ids), metered.

StreamingPull (and Pull, with ``new_subscription_not_found_on_pull``) answers NOT_FOUND for
``new_subscription_not_found_seconds`` after the subscription was created through the layer (for a
``new_subscription_not_found_rate`` share of the creations)
(googleapis/java-pubsub#81, googleapis/google-cloud-go#9723). A subscription the
local stack marks as push-delivered (read by its Eventarc stand-in, ``local/dispatcher.py``) is exempt from
what only a Pull call meets (the race, empty answers, NOT_FOUND after creation): production delivers it by push.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.pubsub_v1 import types as pubsub_types

from dagster_gcf_pipes.local.production_semantics.admin import TokenBucket, is_admin, request_class, resources
from dagster_gcf_pipes.local.production_semantics.behaviours import Behaviours
from dagster_gcf_pipes.local.production_semantics.delivery import Deliveries
from dagster_gcf_pipes.local.production_semantics.filters import FilterError, compile_filter
from dagster_gcf_pipes.local.production_semantics.meter import MIN_BILLED_REQUEST_BYTES, Meter, message_bytes
from dagster_gcf_pipes.local.production_semantics.subscriptions import Registry, Subscription, wait_any

_log = logging.getLogger(__name__)

SUBSCRIBER = "/google.pubsub.v1.Subscriber/"
PUBLISHER = "/google.pubsub.v1.Publisher/"
STREAMING_PULL = SUBSCRIBER + "StreamingPull"
#: the timeout of the layer's own return_immediately Pulls of the emulator
UPSTREAM_PULL_TIMEOUT_SECONDS = 10.0

#: no size limits, as on production channels (Pub/Sub's own cap is 10 MB a message)
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
#: a waiting Pull asks the emulator again at least this often (a publish on its topic or a nack wakes it at
#: once; this catches redeliveries after an ack deadline and messages published straight to the emulator)
IDLE_POLL_SECONDS = 0.5
#: how long before its race window a waiting Pull asks the emulator for the last time on its own
LAST_ASK_MARGIN_SECONDS = 0.02
#: how long a Pull without a client deadline is held
NO_DEADLINE_HOLD_SECONDS = 60.0
#: each upstream call the layer makes on its own behalf (lookups, the acks of filtered-out messages)
OWN_CALL_TIMEOUT_SECONDS = 30.0
#: metadata the gRPC runtime sets itself and must not be relayed
_TRANSPORT_METADATA = frozenset({"te", "content-type", "user-agent", "grpc-timeout", "grpc-accept-encoding", "grpc-encoding"})

AcknowledgeRequest = pubsub_types.AcknowledgeRequest.pb()
ModifyAckDeadlineRequest = pubsub_types.ModifyAckDeadlineRequest.pb()
PublishRequest = pubsub_types.PublishRequest.pb()
PublishResponse = pubsub_types.PublishResponse.pb()
PullRequest = pubsub_types.PullRequest.pb()
PullResponse = pubsub_types.PullResponse.pb()
StreamingPullRequest = pubsub_types.StreamingPullRequest.pb()
StreamingPullResponse = pubsub_types.StreamingPullResponse.pb()
SubscriptionPb = pubsub_types.Subscription.pb()
GetSubscriptionRequest = pubsub_types.GetSubscriptionRequest.pb()
UpdateSubscriptionRequest = pubsub_types.UpdateSubscriptionRequest.pb()


class Layer:
    """The layer's state: its settings, meter, random source and what it knows of the subscriptions."""

    def __init__(self, upstream: str, settings: Behaviours):
        self.upstream = upstream
        self.channel = grpc.aio.insecure_channel(upstream, options=CHANNEL_OPTIONS)
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.meter = Meter()
        self.bucket = TokenBucket(settings.admin_ops_per_minute)
        self.registry = Registry(self._look_up)
        self.deliveries = Deliveries(lambda: self.settings, self.meter, self.rng, self._acknowledge)

    def configure(self, **changes: Any) -> Behaviours:
        """Replace the settings (``ValueError`` naming a bad one); a new ``seed`` re-seeds the random source."""
        settings = self.settings.updated(**changes)
        if "seed" in changes:
            self.rng.seed(settings.seed)
        self.settings = settings
        return settings

    def reset_meter(self) -> None:
        fresh = Meter()
        self.meter.total, self.meter.subscriptions, self.meter.topics = fresh.total, fresh.subscriptions, fresh.topics

    def unary(self, method: str) -> Any:
        return self.channel.unary_unary(method)

    async def _look_up(self, path: str) -> bytes | None:
        try:
            return await self.unary(SUBSCRIBER + "GetSubscription")(
                GetSubscriptionRequest(subscription=path).SerializeToString(), timeout=OWN_CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def _acknowledge(self, subscription: str, ack_ids: list[str]) -> None:
        """Ack on the subscriber's behalf (messages its filter drops); a failure only means they come back."""
        try:
            await self.unary(SUBSCRIBER + "Acknowledge")(
                AcknowledgeRequest(subscription=subscription, ack_ids=ack_ids).SerializeToString(),
                timeout=OWN_CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            _log.warning("acking %d filtered-out message(s) of %s failed (they come back): %s", len(ack_ids), subscription, exc)


def _metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (key, value) for key, value in (context.invocation_metadata() or ())
        if not key.startswith(":") and key not in _TRANSPORT_METADATA
    )


def _not_found(path: str) -> str:
    return f"Resource not found (resource={path.rsplit('/', 1)[-1]})."


class Proxy(grpc.GenericRpcHandler):
    """Every Pub/Sub method, relayed to ``layer.upstream`` (see the module docstring)."""

    def __init__(self, layer: Layer):
        self.layer = layer

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method == STREAMING_PULL:
            return grpc.stream_stream_rpc_method_handler(self._streaming_pull)
        handler = {
            PUBLISHER + "Publish": self._publish,
            SUBSCRIBER + "Pull": self._pull,
            SUBSCRIBER + "Acknowledge": self._acknowledge,
            SUBSCRIBER + "ModifyAckDeadline": self._modify_ack_deadline,
        }.get(method)

        async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if handler is not None:
                return await handler(method, request, context)
            if is_admin(method):
                return await self._admin(method, request, context)
            return await self._forward(method, request, context)

        return grpc.unary_unary_rpc_method_handler(behaviour)

    # ---------------------------------------------------------------------------------------------- relay
    async def _forward(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Relay a unary call; an upstream error is the caller's error."""
        try:
            return await self.layer.unary(method)(request, timeout=context.time_remaining(), metadata=_metadata(context))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
            raise  # abort raises; this keeps type checkers informed

    # ---------------------------------------------------------------------------------------------- admin
    async def _admin(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        layer, settings = self.layer, self.layer.settings
        name = method.rsplit("/", 1)[-1]
        pb_class = request_class(method)
        parsed = pb_class.FromString(request) if pb_class is not None else None
        subscription, topic = resources(method, parsed) if parsed is not None else (None, None)
        layer.meter.admin_op(name, subscription=subscription, topic=topic)
        if not layer.bucket.take(settings.admin_ops_per_minute):
            layer.meter.count(subscription=subscription, topic=topic, admin_quota_refused=1)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Quota exceeded for quota metric 'Administrator operations' of service pubsub.googleapis.com: "
                f"{settings.admin_ops_per_minute} per minute (production-semantics layer: admin_ops_per_minute)",
            )
        if name == "CreateSubscription":
            try:
                compile_filter(parsed.filter)
            except FilterError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid filter expression {parsed.filter!r}: {exc}")
        if name == "UpdateSubscription" and "filter" in UpdateSubscriptionRequest.FromString(request).update_mask.paths:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "A subscription's filter cannot be changed after it is created"
            )
        answer = await self._forward(method, request, context)
        loop = asyncio.get_running_loop()
        if name == "CreateSubscription":
            # a subscription is refused for a while after its creation only if it drew one of those creations
            refused = layer.rng.random() < settings.new_subscription_not_found_rate
            layer.registry.learn(SubscriptionPb.FromString(answer), created_at=loop.time() if refused else None)
        elif name in ("GetSubscription", "UpdateSubscription"):
            layer.registry.learn(SubscriptionPb.FromString(answer))
        elif name == "DeleteSubscription" and subscription:
            layer.registry.forget(subscription)
        elif name == "Seek" and subscription:
            layer.meter.count(subscription=subscription, seeks=1)
            layer.registry.state(subscription).signal.notify()  # messages may be available again
        if layer.rng.random() < settings.lost_admin_response_rate:
            layer.meter.count(subscription=subscription, topic=topic, lost_admin_responses=1)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{name} was performed but its response was lost (production-semantics layer)"
            )
        return answer

    async def _refuse_if_new(self, subscription: Subscription, context: grpc.aio.ServicerContext, *, pull: bool) -> None:
        """NOT_FOUND from a StreamingPull (a Pull with ``new_subscription_not_found_on_pull``) within
        ``new_subscription_not_found_seconds`` of the subscription's creation."""
        settings = self.layer.settings
        created = subscription.created_at
        if (
            subscription.push_delivered or created is None or (pull and not settings.new_subscription_not_found_on_pull)
            or asyncio.get_running_loop().time() - created >= settings.new_subscription_not_found_seconds
        ):
            return
        self.layer.meter.count(subscription=subscription.path, not_found=1)
        await context.abort(grpc.StatusCode.NOT_FOUND, _not_found(subscription.path))

    # -------------------------------------------------------------------------------------------- publish
    async def _publish(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        answer = await self._forward(method, request, context)
        parsed, ids = PublishRequest.FromString(request), PublishResponse.FromString(answer).message_ids
        size = sum(message_bytes(m, i) for m, i in zip(parsed.messages, ids))
        meter = self.layer.meter
        meter.count(
            topic=parsed.topic, publish_requests=1, messages_published=len(parsed.messages), bytes_published=size,
            billed_publish_bytes=max(size, MIN_BILLED_REQUEST_BYTES),
        )
        for subscription in self.layer.registry.on_topic(parsed.topic):
            if subscription.retain_acked:
                meter.count(subscription=subscription.path, retained_bytes=size)
        self.layer.registry.topic_signal(parsed.topic).notify()
        return answer

    # ----------------------------------------------------------------------------------------------- pull
    async def _pull(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Pub/Sub holds a Pull until it has messages or its client's deadline passes; whatever it hands the
        Pull within ``pull_race_window_ms`` of that deadline (or after the client went away) never reaches the
        client and stays outstanding until its ack deadline (googleapis/google-cloud-python#8087,
        google-cloud-php#710, python-pubsub#1414). Some Pulls answer empty at once (``empty_pull_rate``).

        The emulator answers an empty Pull about a second before its client's deadline (at once when that is
        under a second), so it never meets the race: here the emulator is asked with ``return_immediately`` and
        the layer does the holding."""
        layer = self.layer
        parsed = PullRequest.FromString(request)
        layer.meter.count(subscription=parsed.subscription, pull_calls=1)
        subscription = await layer.registry.configured(parsed.subscription)
        if subscription is None:
            return await self._forward(method, request, context)  # the emulator says it does not exist
        await self._refuse_if_new(subscription, context, pull=True)
        settings = layer.settings
        pulled = not subscription.push_delivered
        if pulled and layer.rng.random() < settings.empty_pull_rate:
            layer.meter.count(subscription=subscription.path, empty_pulls=1)
            return b""
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = loop.time() + (NO_DEADLINE_HOLD_SECONDS if remaining is None else remaining)
        window = settings.pull_race_window_ms / 1000 if pulled else 0.0
        parsed.return_immediately = True
        upstream = parsed.SerializeToString()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:  # over: a Pull past its deadline is handed nothing more (the race is the window)
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            ready = [] if remaining < window else layer.deliveries.due(subscription, parsed.max_messages)
            if not ready:
                ready = await self._pull_upstream(subscription, upstream, parsed.max_messages, deadline, window, context)
            if ready:
                return PullResponse(received_messages=ready).SerializeToString()
            # the last ask of its own is just before the race window: on Pub/Sub what became available before
            # it reaches the client, and only what is handed out within the window (a publish or a nack waking
            # the Pull there) is lost
            now = loop.time()
            last_ask = deadline - window - LAST_ASK_MARGIN_SECONDS
            await wait_any(
                [subscription.signal, layer.registry.topic_signal(subscription.topic)],
                max(0.0, min(IDLE_POLL_SECONDS, last_ask - now) if now < last_ask else deadline - now),
            )

    async def _pull_upstream(
        self, subscription: Subscription, request: bytes, max_messages: int, deadline: float, window: float,
        context: grpc.aio.ServicerContext,
    ) -> list[Any]:
        """One ``return_immediately`` Pull of the emulator; what it hands out within ``window`` of ``deadline``,
        or after the client went away, is lost (see ``_pull``)."""
        layer, loop = self.layer, asyncio.get_running_loop()
        # a return_immediately Pull answers at once: its own timeout is generous, never the client's last
        # millisecond (the emulator assigns messages to a call whose 1 ms deadline passed, and they were lost
        # to every pull, not only within the race window)
        call = asyncio.ensure_future(layer.unary(SUBSCRIBER + "Pull")(
            request, timeout=UPSTREAM_PULL_TIMEOUT_SECONDS, metadata=_metadata(context)
        ))
        try:
            answer = await asyncio.shield(call)
        except asyncio.CancelledError:  # the client went away: what the emulator assigns meanwhile is lost
            call.add_done_callback(lambda done: self._lost(subscription, done))
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return []
            await context.abort(exc.code(), exc.details() or "")
        messages = PullResponse.FromString(answer).received_messages
        lose = deadline - loop.time() < window
        return layer.deliveries.received(
            subscription, messages, subscription.ack_deadline_seconds, lose=lose, limit=max_messages
        )

    def _lost(self, subscription: Subscription, call: asyncio.Future[bytes]) -> None:
        if not call.cancelled() and call.exception() is None:
            messages = PullResponse.FromString(call.result()).received_messages
            self.layer.deliveries.received(subscription, messages, subscription.ack_deadline_seconds, lose=True)

    # ----------------------------------------------------------------------------------------------- acks
    async def _acknowledge(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        deliveries = self.layer.deliveries
        parsed = AcknowledgeRequest.FromString(request)
        return await self._screened(method, parsed, context, "acknowledge_calls", deliveries.acknowledged)

    async def _modify_ack_deadline(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        deliveries = self.layer.deliveries
        parsed = ModifyAckDeadlineRequest.FromString(request)
        return await self._screened(
            method, parsed, context, "modify_ack_deadline_calls",
            lambda subscription, passed: deliveries.extended(subscription, passed, parsed.ack_deadline_seconds),
        )

    async def _screened(
        self, method: str, parsed: Any, context: grpc.aio.ServicerContext, counter: str,
        passed_on: Callable[[Subscription, list[str]], None],
    ) -> bytes:
        """An Acknowledge or ModifyAckDeadline without the ack ids the layer answers itself (duplicates) or does
        not honour (late), forwarded if any is left; ``passed_on`` notes what was."""
        layer = self.layer
        layer.meter.count(subscription=parsed.subscription, **{counter: 1})
        subscription = layer.registry.state(parsed.subscription)
        passed = _kept(parsed.ack_ids, layer.deliveries.screen(subscription, parsed.ack_ids))
        if passed:
            del parsed.ack_ids[:]
            parsed.ack_ids.extend(passed)
            await self._forward(method, parsed.SerializeToString(), context)
            passed_on(subscription, passed)
        return b""  # google.protobuf.Empty

    # -------------------------------------------------------------------------------------- streaming pull
    async def _streaming_pull(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        parsed = StreamingPullRequest.FromString(first)
        layer = self.layer
        layer.meter.count(subscription=parsed.subscription, streaming_pulls_opened=1)
        subscription = await layer.registry.configured(parsed.subscription) or layer.registry.state(parsed.subscription)
        await self._refuse_if_new(subscription, context, pull=False)
        await _Stream(layer, subscription, context, parsed.stream_ack_deadline_seconds).run(parsed)


def _kept(items: Sequence[Any], verdicts: Sequence[bool]) -> list[Any]:
    return [item for item, keep in zip(items, verdicts) if keep]


class _Stream:
    """One client's StreamingPull, relayed to an upstream stream of its own.

    When the client's stream ends, however it ends (closed, cancelled, its process killed), the upstream
    stream is cancelled, so the emulator stops assigning messages to it; the messages it had assigned come
    back after their ack deadline, as on production Pub/Sub, which ends a dead client's stream."""

    def __init__(self, layer: Layer, subscription: Subscription, context: grpc.aio.ServicerContext, ack_deadline: int):
        self.layer = layer
        self.subscription = subscription
        self.context = context
        self.ack_deadline = ack_deadline or subscription.ack_deadline_seconds
        self._writing = asyncio.Lock()
        self._call: Any = None

    async def run(self, first: Any) -> None:
        self._call = self.layer.channel.stream_stream(STREAMING_PULL)(metadata=_metadata(self.context))
        await self._call.write(self._screened(first).SerializeToString())
        helpers = [asyncio.ensure_future(self._requests()), asyncio.ensure_future(self._flush())]
        for helper in helpers:  # a helper that fails (the upstream stream ended under it) ends with the stream
            helper.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            await self._responses()
        finally:
            for helper in helpers:
                helper.cancel()
            self._call.cancel()

    async def _responses(self) -> None:
        deliveries = self.layer.deliveries
        while True:
            try:
                answer = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                await self.context.abort(exc.code(), exc.details() or "")
            if answer is grpc.aio.EOF:
                break
            response = StreamingPullResponse.FromString(answer)
            ready = deliveries.received(self.subscription, response.received_messages, self.ack_deadline)
            del response.received_messages[:]
            response.received_messages.extend(ready)
            if response.ListFields():
                await self._send(response)
        code = await self._call.code()
        if code != grpc.StatusCode.OK:
            await self.context.abort(code, await self._call.details() or "")

    async def _flush(self) -> None:
        """Hand out the subscription's held messages as they come due, when no response carries them."""
        while True:
            await wait_any([self.subscription.signal], IDLE_POLL_SECONDS)
            ready = self.layer.deliveries.due(self.subscription)
            if ready:
                await self._send(StreamingPullResponse(received_messages=ready))

    async def _send(self, response: Any) -> None:
        async with self._writing:
            await self.context.write(response.SerializeToString())

    async def _requests(self) -> None:
        while True:
            raw = await self.context.read()
            if raw is grpc.aio.EOF:
                await self._call.done_writing()
                return
            await self._call.write(self._screened(StreamingPullRequest.FromString(raw)).SerializeToString())

    def _screened(self, request: Any) -> Any:
        """The request without the ack ids the layer answers itself (duplicates) or does not honour (late);
        what passes is noted (acked, or its new deadline)."""
        layer, subscription = self.layer, self.subscription
        if request.stream_ack_deadline_seconds:
            self.ack_deadline = request.stream_ack_deadline_seconds
        if request.ack_ids:
            layer.meter.count(subscription=subscription.path, acknowledge_calls=1)
            passed = _kept(request.ack_ids, layer.deliveries.screen(subscription, request.ack_ids))
            del request.ack_ids[:]
            request.ack_ids.extend(passed)
            layer.deliveries.acknowledged(subscription, passed)
        if request.modify_deadline_ack_ids:
            layer.meter.count(subscription=subscription.path, modify_ack_deadline_calls=1)
            pairs = list(zip(request.modify_deadline_ack_ids, request.modify_deadline_seconds))
            passed = _kept(pairs, layer.deliveries.screen(subscription, [ack_id for ack_id, _ in pairs]))
            del request.modify_deadline_ack_ids[:]
            del request.modify_deadline_seconds[:]
            for ack_id, seconds in passed:
                request.modify_deadline_ack_ids.append(ack_id)
                request.modify_deadline_seconds.append(seconds)
                layer.deliveries.extended(subscription, [ack_id], seconds)
        return request
