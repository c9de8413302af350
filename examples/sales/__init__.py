"""The sales example: a Cloud Function that writes fake sales data to GCS, and the Dagster assets that run it."""
