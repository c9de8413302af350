"""The control endpoint's client: what ``LocalStack.semantics`` is.

    with stack.semantics.behaving(duplicate_rate=1.0):   # every message delivered twice, in this block
        ...
    stack.semantics.reset_meter()
    ...                                                  # one run
    print(stack.semantics.meter().total.admin_ops_total)
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from dagster_gcf_pipes.local.production_semantics.behaviours import Behaviours
from dagster_gcf_pipes.local.production_semantics.meter import Meter


class SemanticsClient:
    def __init__(self, url: str):
        """``url``: the control endpoint, ``http://127.0.0.1:PORT``."""
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            problem = json.loads(exc.read() or b"{}").get("error", exc.reason)
            raise ValueError(f"the production-semantics layer refused {method} {path}: {problem}") from None

    def settings(self) -> Behaviours:
        return Behaviours(**self._call("GET", "/settings"))

    def configure(self, **settings: Any) -> Behaviours:
        """Change the named settings (the others keep their values); the settings now in force."""
        return Behaviours(**self._call("POST", "/settings", settings))

    @contextlib.contextmanager
    def behaving(self, **settings: Any) -> Iterator[Behaviours]:
        """The named settings for the block; the previous settings again after it, however it ends."""
        previous = self.settings()
        try:
            yield self.configure(**settings)
        finally:
            self.configure(**{name: getattr(previous, name) for name in settings})

    def meter(self) -> Meter:
        """A snapshot of the meter (since the stack started, or the last ``reset_meter()``)."""
        return Meter.from_dict(self._call("GET", "/meter"))

    def reset_meter(self) -> None:
        self._call("POST", "/meter/reset", {})

    def mark_push_delivered(self, subscription: str) -> None:
        """``subscription`` is delivered by the local stack's Eventarc stand-in: its pulls stand for push
        deliveries (no pull race, no empty answers, no NOT_FOUND after creation)."""
        self._call("POST", "/push-delivered", {"subscription": subscription})
