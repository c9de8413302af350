"""The layer's control endpoint: plain HTTP/1.1 on loopback, JSON in and out, served by the proxy's event
loop (so a request sees the layer between two gRPC events, never in the middle of one).

- ``GET /``: ``Ok`` (the local stack's readiness check)
- ``GET /settings``; ``POST /settings`` with the fields to change: the settings after the change, or 400 with
  the problem (an unknown name, a rate outside 0..1, a wrong type)
- ``GET /meter``: the meter (``{"total": ..., "subscriptions": {path: ...}, "topics": {path: ...}}``);
  ``POST /meter/reset`` zeroes it
- ``POST /push-delivered`` with ``{"subscription": path}``: the subscription is delivered by the local stack's
  Eventarc stand-in, whose pulls stand for push deliveries
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from dagster_gcf_pipes.local.production_semantics.proxy import Layer

_log = logging.getLogger(__name__)

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _route(layer: Layer, method: str, path: str, body: Any) -> tuple[int, Any]:
    if path == "/" and method == "GET":
        return 200, "Ok"
    if path == "/settings":
        if method == "GET":
            return 200, layer.settings.as_dict()
        if not isinstance(body, dict):
            return 400, {"error": "POST /settings takes a JSON object of the settings to change"}
        try:
            return 200, layer.configure(**body).as_dict()
        except (TypeError, ValueError) as exc:
            return 400, {"error": str(exc)}
    if path == "/meter" and method == "GET":
        return 200, layer.meter.as_dict()
    if path == "/meter/reset" and method == "POST":
        layer.reset_meter()
        return 200, {}
    if path == "/push-delivered" and method == "POST":
        if not isinstance(body, dict) or not isinstance(body.get("subscription"), str):
            return 400, {"error": 'POST /push-delivered takes {"subscription": "projects/P/subscriptions/S"}'}
        layer.registry.mark_push_delivered(body["subscription"])
        return 200, {}
    return 404, {"error": f"no {method} {path}: see GET/POST /settings, GET /meter, POST /meter/reset"}


async def _serve(layer: Layer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request_line = (await reader.readline()).decode("latin-1").split()
        headers = {}
        while (line := (await reader.readline()).decode("latin-1").strip()):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", 0)))
        method, path = (request_line + ["", ""])[:2]
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            status, answer = 400, {"error": "the body is not JSON"}
        else:
            status, answer = _route(layer, method, path, body)
        payload = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
        kind = "text/plain" if isinstance(answer, str) else "application/json"
        writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
        )
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
        _log.warning("control request failed: %s", exc)
    finally:
        writer.close()


async def serve_control(layer: Layer, port: int) -> asyncio.Server:
    return await asyncio.start_server(lambda r, w: _serve(layer, r, w), "127.0.0.1", port)
