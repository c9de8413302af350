"""The HTTP-invoked mode's authentication on the real google-auth code path: a service account key whose
``token_uri`` is a local token endpoint (the only stand-in: Google's OAuth server), an ID token minted for
the function's URL as audience, and the POST carrying it as a bearer token."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import jwt

from dagster_gcf_pipes.orchestrator.earlier_design.http_invocation import HttpInvocation, http_session


def _unsigned_jwt(claims: dict) -> str:
    part = lambda value: base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


class _Endpoints(BaseHTTPRequestHandler):
    """/token: Google's OAuth token endpoint for a JWT-bearer grant; anything else: the function."""

    seen: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/token":
            assertion = urllib.parse.parse_qs(body.decode())["assertion"][0]
            audience = jwt.decode(assertion, verify=False)["target_audience"]
            id_token = _unsigned_jwt({"aud": audience, "exp": int(time.time()) + 3600, "iat": int(time.time())})
            self._answer({"id_token": id_token})
        else:
            self.seen.append((self.headers.get("Authorization", ""), json.loads(body)))
            self._answer({"ran": True})

    def _answer(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoints() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoints)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_post_carries_an_id_token_for_the_function_url(endpoints, tmp_path, monkeypatch):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_file = tmp_path / "key.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": "1", "private_key": pem.decode(),
        "client_email": "pipes-dagster@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": f"{endpoints}/token",
    }))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    function_url = f"{endpoints}/sales"

    invocation = HttpInvocation(http_session(function_url, "id_token"), function_url, timeout=10)
    invocation.start(b"{}", {"dagster_pipes_session": "a" * 32}, "a" * 32)
    deadline = time.monotonic() + 10
    while not invocation.succeeded():
        assert time.monotonic() < deadline, "the POST did not complete"
        time.sleep(0.05)

    ((authorization, body),) = _Endpoints.seen
    scheme, token = authorization.split(" ", 1)
    assert scheme == "Bearer"
    assert jwt.decode(token, verify=False)["aud"] == function_url
    assert body["message"]["attributes"] == {"dagster_pipes_session": "a" * 32}
