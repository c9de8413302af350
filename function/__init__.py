"""The cloud side: what runs in the Cloud Function (or a pull worker). Depends on dagster-pipes, never dagster.

The public API is this module's ``__all__``; the submodules are internal and may change between releases."""

from dagster_gcf_pipes.function.clients import storage_client
from dagster_gcf_pipes.function.context import CloudFunctionPipesContext, SessionCancelled
from dagster_gcf_pipes.function.entrypoint import pipes_function
from dagster_gcf_pipes.function.session import SessionOutcome

__all__ = ["CloudFunctionPipesContext", "SessionCancelled", "SessionOutcome", "pipes_function",
           "storage_client"]
