"""The client's surface: the ``PipesPubSubClient`` resource's settings and their validation, resolving
them into clients and topics (project, the Cloud Functions API for ``function_name``, preflight checks),
one session's lifecycle as the client runs it, and the entry points ``run``, ``run_many`` and
``run_detached``.

May import: ``modes``, ``earlier_design``, ``session``, ``diagnostics`` and ``dagster_gcf_pipes.shared``."""
