"""The HTTP-invoked mode (the earlier design's trigger): the trigger is POSTed to the function's URL and the
response comes when the session has ended.

The request body has the shape of a Pub/Sub push body (``{"message": {"data", "attributes", "messageId"}}``),
so the function's ``.http`` entry point runs exactly the session the Pub/Sub entry point runs. The POST runs
in a thread while the step reads the replies; its outcome only ends the wait early when it failed (or, for
the GCS reply channel, when it succeeded and the remaining chunks are read as the session closes).

On Google Cloud the request carries an ID token for the function's URL, from Application Default
Credentials (a service account, the metadata server or workload identity; user credentials cannot mint
one): the orchestrator's account needs ``roles/run.invoker`` on the function.
"""

from __future__ import annotations

import base64
import secrets
import threading
from collections.abc import Mapping

import google.auth.transport.requests
import requests
from google.auth.transport.requests import AuthorizedSession
from google.oauth2 import id_token
from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from dagster_gcf_pipes.orchestrator.diagnostics.errors import FunctionHttpError

#: Statuses that mean the request never reached a running session: worth sending again (the session lease
#: turns a duplicate into a 409, never a second run).
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


def http_session(url: str, auth: str) -> requests.Session:
    """A requests session for ``url``: with an ID token whose audience is the URL (``auth="id_token"``), or none."""
    if auth == "none":
        return requests.Session()
    credentials = id_token.fetch_id_token_credentials(url, request=google.auth.transport.requests.Request())
    return AuthorizedSession(credentials)


def _worth_retrying(exc: BaseException) -> bool:
    if isinstance(exc, FunctionHttpError):
        return exc.status in RETRIED_STATUSES
    return isinstance(exc, requests.ConnectionError)


def _explain(response: requests.Response) -> str:
    detail = response.text[:2000].strip()
    if response.status_code in (401, 403):
        return (
            f"{detail}; the orchestrator may not invoke it: grant its service account roles/run.invoker on the "
            "function and keep http_auth='id_token'"
        )
    if response.status_code == 404:
        return f"{detail}; no function serves that URL: check function_url (gcloud functions describe F --format='value(url)')"
    return detail


class HttpInvocation:
    """One POST of a trigger, in a background thread; ``succeeded()`` reports how it went."""

    def __init__(self, session: requests.Session, url: str, *, timeout: float, retry_seconds: float = 60.0):
        self._session = session
        self._url = url
        self._timeout = timeout
        self._retry_seconds = retry_seconds
        self._thread: threading.Thread | None = None
        self._status: int | None = None
        self._error: BaseException | None = None

    def start(self, data: bytes, attributes: Mapping[str, str], session_id: str) -> None:
        body = {"message": {"data": base64.b64encode(data).decode(), "attributes": dict(attributes), "messageId": session_id}}
        # the session id is a valid W3C trace id: the function's logs and Dagster's metadata name the same trace
        headers = {"traceparent": f"00-{session_id}-{secrets.token_hex(8)}-00"}
        self._thread = threading.Thread(target=self._post, args=(body, headers), name=f"pipes-http-{session_id}", daemon=True)
        self._thread.start()

    def _post(self, body: dict, headers: dict[str, str]) -> None:
        send = retry(
            retry=retry_if_exception(_worth_retrying),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            stop=stop_after_delay(self._retry_seconds),
            reraise=True,
        )(self._send)
        try:
            self._status = send(body, headers)
        except FunctionHttpError as exc:
            self._error = exc
        except Exception as exc:  # noqa: BLE001 - handed to the step through succeeded()
            self._error = FunctionHttpError(self._url, None, f"could not reach it ({exc!r}); check function_url")

    def _send(self, body: dict, headers: dict[str, str]) -> int:
        try:
            response = self._session.post(self._url, json=body, timeout=self._timeout, headers=headers)
        except requests.Timeout as exc:
            raise FunctionHttpError(
                self._url, None, f"no response within http_timeout={self._timeout:g}s: raise http_timeout to at least "
                "the function's timeout"
            ) from exc
        if response.status_code in (200, 409):  # 409: another invocation of this session holds its lease
            return response.status_code
        raise FunctionHttpError(self._url, response.status_code, _explain(response))

    def succeeded(self) -> bool:
        """True once the function answered 200 (the session ran); raises ``FunctionHttpError`` (or the
        connection error) once the request failed for good; False while it runs, and after a 409."""
        if self._error is not None:
            raise self._error
        return self._status == 200
