"""The Dagster side: the Pipes client resource, its context injector and message reader, the sensors.

The public API is this module's ``__all__``; the submodules are internal and may change between releases."""

from dagster_gcf_pipes.orchestrator.client.client import DetachedSession, PipesPubSubClient
from dagster_gcf_pipes.orchestrator.definitions.component import CloudFunctionComponent
from dagster_gcf_pipes.orchestrator.session.context_injectors import PipesPubSubContextInjector
from dagster_gcf_pipes.orchestrator.definitions.completion_sensor import pipes_completion_sensor
from dagster_gcf_pipes.orchestrator.diagnostics.errors import (
    CloudFunctionError,
    FunctionHeartbeatTimeout,
    FunctionHttpError,
    FunctionStartupTimeout,
    FunctionTotalTimeout,
    PipesPubSubConfigError,
    PipesPubSubError,
)
from dagster_gcf_pipes.orchestrator.modes.fanout import FanOutError, FanOutResult, ShardOutcome
from dagster_gcf_pipes.orchestrator.session.message_reader import PipesPubSubMessageReader
from dagster_gcf_pipes.orchestrator.definitions.sensors import GcsObjectEvent, PubSubEvent, gcs_object_event, pubsub_sensor
from dagster_gcf_pipes.orchestrator.diagnostics.tracing import CLOUD_TRACE_URL_TEMPLATE

__all__ = [
    "CLOUD_TRACE_URL_TEMPLATE",
    "CloudFunctionComponent",
    "CloudFunctionError",
    "DetachedSession",
    "FanOutError",
    "FanOutResult",
    "FunctionHeartbeatTimeout",
    "FunctionHttpError",
    "FunctionStartupTimeout",
    "FunctionTotalTimeout",
    "GcsObjectEvent",
    "PipesPubSubClient",
    "PipesPubSubConfigError",
    "PipesPubSubContextInjector",
    "PipesPubSubError",
    "PipesPubSubMessageReader",
    "PubSubEvent",
    "ShardOutcome",
    "gcs_object_event",
    "pipes_completion_sensor",
    "pubsub_sensor",
]
