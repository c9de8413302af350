"""What the orchestrator tells the user when something goes wrong or takes time: the error types a step
fails with, and OpenTelemetry tracing of sessions.

May import: ``dagster_gcf_pipes.shared`` and libraries. The bottom layer: every other package of the
orchestrator may import it; it imports none of them."""
