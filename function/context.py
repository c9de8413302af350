"""The Pipes context handed to a handler: dagster-pipes' ``PipesContext``, one per invocation, plus the
session's cooperative cancellation."""

from __future__ import annotations

import threading

from dagster_pipes import PipesContext, PipesContextLoader, PipesMessageWriter, PipesParamsLoader


class SessionCancelled(Exception):
    """Raised by ``raise_if_cancelled()`` once Dagster asked the session to stop."""


class CloudFunctionPipesContext(PipesContext):
    def __init__(
        self,
        params_loader: PipesParamsLoader,
        context_loader: PipesContextLoader,
        message_writer: PipesMessageWriter,
        cancelled: threading.Event,
    ) -> None:
        super().__init__(params_loader, context_loader, message_writer)
        self._cancelled = cancelled

    @property
    def is_cancelled(self) -> bool:
        """True once the Dagster run was terminated and the orchestrator asked this session to stop."""
        return self._cancelled.is_set()

    def raise_if_cancelled(self) -> None:
        """Stop here (with ``SessionCancelled``, reported through ``closed``) if the session was cancelled."""
        if self.is_cancelled:
            raise SessionCancelled("the Dagster run was terminated: the orchestrator cancelled this session")
