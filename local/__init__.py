"""The local stack: Google's Pub/Sub emulator, fake-gcs-server and the Functions Framework on loopback ports,
wired as Eventarc wires a deployed function. Tooling only: nothing in the function or the Dagster side imports
it, and it never ships in a deployed function (``pip install 'dagster-gcf-pipes[local]'``)."""

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack, LocalStackError

__all__ = ["LocalFunction", "LocalStack", "LocalStackError"]
