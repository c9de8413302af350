"""One session's machinery: the context injector, the reply subscription and its pull calls, the message
reader that decodes, deduplicates, orders and fences replies into Dagster, waiting with its timeouts, the
durable end of a session (lease tombstone, cleanup) and re-attach to an earlier attempt's sessions.

May import: ``diagnostics`` and ``dagster_gcf_pipes.shared``. Layers of the orchestrator, bottom to top:
diagnostics, session, earlier_design, modes, client, definitions; a package imports only those below it."""
