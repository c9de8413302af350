"""The wire protocol shared by the orchestrator and the function: imports neither side."""
