"""A first run on a laptop with neither Google credentials nor the local stack's variables: the step fails with a
``PipesPubSubConfigError`` naming both ways out (ADC for Google Cloud, the variables ``gcf-pipes up`` prints for
the local stack), not Google's bare ``DefaultCredentialsError``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MATERIALIZE = """
import sys
from dagster import AssetExecutionContext, asset, materialize
from dagster_gcf_pipes.orchestrator import PipesPubSubClient

@asset
def orders(context: AssetExecutionContext, pipes: PipesPubSubClient):
    return pipes.run(context=context, payload={}).get_materialize_result()

client = PipesPubSubClient(project=sys.argv[1] or None, trigger_topic="t", reply_topic="r", bucket="b")
materialize([orders], resources={"pipes": client})
"""


@pytest.mark.parametrize("project", ["my-project", ""], ids=["project set", "no project"])
def test_no_credentials_names_the_local_stack(tmp_path: Path, project: str):
    env = {key: value for key, value in os.environ.items()
           if key not in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT",
                          "GOOGLE_APPLICATION_CREDENTIALS", "DAGSTER_HOME")}
    # no gcloud configuration, and no metadata server to ask (google-auth reads NO_GCE_CHECK at import)
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="true")
    run = subprocess.run([sys.executable, "-c", MATERIALIZE, project], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    error = run.stderr.strip().splitlines()[-1]  # what materialize raised: the step's own exception
    assert error.startswith("dagster_gcf_pipes.orchestrator.diagnostics.errors.PipesPubSubConfigError"), run.stderr[-3000:]
    assert "gcloud auth application-default login" in error and "gcf-pipes dev" in error, error
    assert "PUBSUB_EMULATOR_HOST" in error and "gcf-pipes up" in error, error
