"""The machinery of the modes built on sessions, driven by the client's entry points: fan-out's bounded
concurrency, shard retries and progress (``run_many``), and detached mode's registry of pending sessions
(``run_detached``).

May import: ``session``, ``earlier_design``, ``diagnostics`` and ``dagster_gcf_pipes.shared``."""
