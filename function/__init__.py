"""The cloud side: what runs in the Cloud Function (or a pull worker). Depends on dagster-pipes, never dagster."""
