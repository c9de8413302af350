"""The Dagster side: the Pipes client resource, its context injector and message reader, the local stack."""

from orchestrator.client import PipesPubSubClient
from orchestrator.errors import (
    CloudFunctionError,
    FunctionHeartbeatTimeout,
    FunctionStartupTimeout,
    FunctionTotalTimeout,
    PipesPubSubConfigError,
)

__all__ = [
    "CloudFunctionError",
    "FunctionHeartbeatTimeout",
    "FunctionStartupTimeout",
    "FunctionTotalTimeout",
    "PipesPubSubClient",
    "PipesPubSubConfigError",
]
