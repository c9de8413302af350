"""An in-process fake of the Cloud Functions v2 ``FunctionService`` on loopback gRPC, serving ``GetFunction``.

Tests drive the real ``FunctionServiceClient`` against it, so the request and response really cross the
wire (proto serialization, status codes mapped to ``google.api_core`` exceptions) without a GCP project."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
from google.cloud import functions_v2
from google.cloud.functions_v2.services.function_service.transports.grpc import FunctionServiceGrpcTransport

SERVICE = "google.cloud.functions.v2.FunctionService"


class FakeFunctionService:
    def __init__(self) -> None:
        self.functions: dict[str, functions_v2.Function] = {}
        self.calls = 0
        self._failures: list[grpc.StatusCode] = []
        self._lock = threading.Lock()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "GetFunction": grpc.unary_unary_rpc_method_handler(
                            self._get_function,
                            request_deserializer=functions_v2.GetFunctionRequest.deserialize,
                            response_serializer=functions_v2.Function.serialize,
                        )
                    },
                ),
            )
        )
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def add(self, function: functions_v2.Function) -> None:
        self.functions[function.name] = function

    def fail_next(self, n: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        """Answer the next ``n`` calls with ``code`` instead of the function."""
        with self._lock:
            self._failures.extend([code] * n)

    def client(self) -> functions_v2.FunctionServiceClient:
        """The real client, talking to this fake."""
        return functions_v2.FunctionServiceClient(
            transport=FunctionServiceGrpcTransport(channel=grpc.insecure_channel(self.address))
        )

    def _get_function(
        self, request: functions_v2.GetFunctionRequest, context: grpc.ServicerContext
    ) -> functions_v2.Function:
        with self._lock:
            self.calls += 1
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            context.abort(failure, f"scripted {failure.name}")
        if request.name not in self.functions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Resource '{request.name}' was not found")
        return self.functions[request.name]


@contextmanager
def running_fake() -> Iterator[FakeFunctionService]:
    fake = FakeFunctionService()
    fake._server.start()
    try:
        yield fake
    finally:
        fake._server.stop(grace=None)
