"""What a code location declares on top of the client: the event sensor (``pubsub_sensor``), detached mode's
completion sensor and the YAML ``CloudFunctionComponent``.

May import: every other package of the orchestrator and ``dagster_gcf_pipes.shared``; none imports it
except the orchestrator's ``__init__`` (the public API)."""
