"""The seed's earlier design, kept as a mode: the function invoked over HTTP (``invocation="http"``) and
replies as JSON chunks in GCS polled every few seconds (``reply_channel="gcs"``).

May import: ``session``, ``diagnostics`` and ``dagster_gcf_pipes.shared``."""
