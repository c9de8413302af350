"""A Node.js function (examples/node_function, the TypeScript function side in node/) materialized from Dagster
through the local stack: ``LocalFunction`` serves a ``.js`` source with Google's Node.js Functions Framework,
behind the same dispatcher and production-semantics layer as the Python functions.

Needs node/ built and the example installed (``make test`` does both; the stack runs ``npm ci`` in the
example's folder itself when its node_modules is missing)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.cloud import storage

from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStack
from tests import REPO_ROOT
from tests.conftest import LAKE_BUCKET
from tests.integration.helpers import make_client, run_asset

NODE_TOPIC = "node-trigger"
EXAMPLE = REPO_ROOT / "examples" / "node_function"


@pytest.fixture(scope="module")
def node_topic(stack: LocalStack) -> Iterator[str]:
    if not (REPO_ROOT / "node" / "dist" / "index.js").exists():
        pytest.fail("the Node.js function side is not built: run `make -C node build` (make test does)")
    function = LocalFunction(EXAMPLE / "index.js", "main", NODE_TOPIC)
    assert function.language == "nodejs"
    server = stack.add_function(function)
    yield NODE_TOPIC
    stack.servers.pop(f"function-{NODE_TOPIC}", None)
    server.stop()


def test_node_function_logs_prints_and_materializes(node_topic: str, capfd: pytest.CaptureFixture[str]) -> None:
    outcome = run_asset(make_client(trigger_topic=node_topic), {"dl_bucket": f"gs://{LAKE_BUCKET}", "rows": 7})

    assert outcome.result.success
    assert "generating 7 rows of fake sales data" in outcome.log_messages
    metadata = outcome.metadata
    assert metadata["row_count"] == 7
    assert metadata["runtime"].startswith("node ")
    assert metadata["table_location"] == f"gs://{LAKE_BUCKET}/sales/pipes_test_asset/part-0.csv"
    csv = storage.Client().bucket(LAKE_BUCKET).blob("sales/pipes_test_asset/part-0.csv").download_as_text()
    assert len(csv.splitlines()) == 1 + 7
    (custom,) = outcome.custom_messages
    assert custom["rows"] == 7 and custom["total"] == pytest.approx(metadata["total_amount"])
    assert "printed by the handler: 7 rows" in capfd.readouterr().out


def test_node_function_error_fails_the_step_with_its_js_stack(node_topic: str) -> None:
    outcome = run_asset(make_client(trigger_topic=node_topic), {"fail": "on purpose"})

    assert not outcome.result.success
    error = outcome.failure_message
    assert "CloudFunctionError" in error, error
    assert "asked to fail: on purpose" in error, error
    assert f"{EXAMPLE / 'index.js'}:" in error, error  # a frame of the JS stack, in the handler's file
