"""CloudFunctionComponent: a defs folder loaded by Dagster's own loader, its assets materialized on the local
stack (single, fan-out, detached), and invalid instances rejected with dg's file-and-line errors."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetKey,
    AutomationCondition,
    DagsterInstance,
    Definitions,
    SensorDefinition,
    SensorResult,
    StaticPartitionsDefinition,
    build_sensor_context,
    load_from_defs_folder,
    materialize,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from dagster_gcf_pipes.orchestrator.definitions.component import CloudFunctionComponent, attributes_table
from tests.conftest import PAYLOAD_BUCKET, REPLY_TOPIC, TEST_TOPIC
from tests.integration.helpers import session_objects
from tests.integration.test_round_trip import sha256_json
from tests.modes.test_detached import create_reply_topic

TYPE = "dagster_gcf_pipes.orchestrator.CloudFunctionComponent"
DG = str(Path(sys.executable).parent / "dg")
REPO = Path(__file__).resolve().parents[2]

#: what every instance shares: the test function, fast heartbeats, topics and bucket from the environment
CLIENT = """\
  trigger_topic: "{{ env.CT_TRIGGER_TOPIC }}"
  reply_topic: "{{ env.CT_REPLY_TOPIC }}"
  bucket: "{{ env.CT_BUCKET }}"
  heartbeat_interval: 2
  heartbeat_timeout: 20
  startup_timeout: 30
"""

INSTANCES = {
    "single": CLIENT
    + """\
  assets:
    - key: component/single
      group_name: yaml
      owners: [team:data]
      deps: [upstream_table]
      automation_condition: "{{ dg.AutomationCondition.eager() }}"
      partitions_def: {type: static, partition_keys: [north, south]}
  payload:
    n: 7
    region: "{{ partition_key }}"
    requested_by: "{{ run_tags.get('who', 'nobody') }}"
""",
    # loaded, not run: the test function reports no checks, and a declared check must be reported
    "checked": CLIENT
    + """\
  assets:
    - key: component/checked_a
    - key: component/checked_b
  checks:
    - name: has_rows
      asset: component/checked_a
      blocking: true
""",
    "fanned": CLIENT
    + """\
  assets:
    - key: component/fanned
      kinds: [python]
  mode: fan_out
  fan_out:
    items: [10, 20, 30]
    max_concurrency: 2
  payload:
    n: "{{ item }}"
    shard_index: "{{ shard }}"
""",
    "fanned_checked": CLIENT
    + """\
  assets:
    - key: component/fanned_checked
  checks:
    - name: positive
      asset: component/fanned_checked
  mode: fan_out
  fan_out:
    items: [{n: 5, ok: true}, {n: -1, ok: false}, {n: 7, ok: true}]
  payload:
    n: "{{ item.n }}"
    checks: [{name: positive, passed: "{{ item.ok }}"}]
""",
    "ranged": CLIENT
    + """\
  assets:
    - key: component/ranged
      partitions_def: {type: static, partition_keys: [p1, p2, p3, p4]}
  mode: fan_out
  fan_out:
    partition_range: true
  payload:
    part: "{{ partition_key }}"
""",
    "later": CLIENT
    + """\
  detached_reply_topic: "{{ env.CT_DETACHED_TOPIC }}"
  assets:
    - key: component/later
  mode: detached
  detached:
    subscription: "{{ env.CT_DETACHED_SUBSCRIPTION }}"
    minimum_interval_seconds: 5
  payload:
    n: 4
    log_lines: 2
""",
}


def write_project(root: Path, instances: dict[str, str]) -> str:
    """A dg project in ``root`` with one component instance per entry; returns its (unique) root module."""
    module = f"cfproj_{uuid.uuid4().hex[:8]}"
    (root / "dg.toml").write_text(f'directory_type = "project"\n\n[project]\nroot_module = "{module}"\n')
    package = root / module
    (package / "defs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    for name, attributes in instances.items():
        (package / "defs" / name).mkdir()
        (package / "defs" / name / "defs.yaml").write_text(f"type: {TYPE}\nattributes:\n{attributes}")
    return module


def load(root: Path, monkeypatch: pytest.MonkeyPatch) -> Definitions:
    monkeypatch.syspath_prepend(str(root))
    return load_from_defs_folder(path_within_project=root)


@pytest.fixture
def detached_topic(stack: Any) -> str:
    """A detached reply topic with its durable subscription (both named by the returned name)."""
    name = f"component-detached-{uuid.uuid4().hex[:8]}"
    create_reply_topic(stack.project, name)
    return name


@pytest.fixture
def project_env(monkeypatch: pytest.MonkeyPatch, detached_topic: str) -> None:
    for variable, value in {
        "CT_TRIGGER_TOPIC": TEST_TOPIC,
        "CT_REPLY_TOPIC": REPLY_TOPIC,
        "CT_BUCKET": PAYLOAD_BUCKET,
        "CT_DETACHED_TOPIC": detached_topic,
        "CT_DETACHED_SUBSCRIPTION": detached_topic,
    }.items():
        monkeypatch.setenv(variable, value)


@pytest.fixture
def defs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, project_env: None) -> Definitions:
    write_project(tmp_path, INSTANCES)
    return load(tmp_path, monkeypatch)


def materialization_metadata(result: Any) -> list[dict[str, Any]]:
    return [
        {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    ]


def test_defs_folder_loads_the_declared_specs(defs: Definitions, detached_topic: str) -> None:
    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    assert set(specs) >= {"component/single", "component/fanned", "component/ranged", "component/later"}
    single = specs["component/single"]
    assert single.group_name == "yaml"
    assert single.owners == ["team:data"]
    assert single.kinds == {"gcp", "cloud-functions"}  # the default
    assert [dep.asset_key for dep in single.deps] == [AssetKey("upstream_table")]
    assert isinstance(single.automation_condition, AutomationCondition)
    assert single.partitions_def == StaticPartitionsDefinition(["north", "south"])
    assert specs["component/fanned"].kinds == {"python"}  # declared kinds win
    (check,) = [c for c in defs.resolve_asset_graph().asset_check_keys if c.name == "has_rows"]
    assert check.asset_key == AssetKey(["component", "checked_a"])
    checked = defs.resolve_assets_def(AssetKey(["component", "checked_a"]))
    assert checked.keys == {AssetKey(["component", "checked_a"]), AssetKey(["component", "checked_b"])}  # one step
    assert checked.get_spec_for_check_key(check).blocking

    # each attached instance brings its own resource, built from the attributes ({{ env.X }} resolved)
    single_client = defs.resources["pipes_pubsub_single"]
    assert (single_client.trigger_topic, single_client.reply_topic, single_client.bucket) == (
        TEST_TOPIC,
        REPLY_TOPIC,
        PAYLOAD_BUCKET,
    )
    assert single_client.heartbeat_interval == 2
    assert {"pipes_pubsub_fanned", "pipes_pubsub_ranged"} <= set(defs.resources)
    # the detached instance: its job, the completion sensor on its subscription, the resource that sensor reads
    assert defs.resolve_job_def("later_job") is not None
    assert defs.resolve_sensor_def("later_completions").minimum_interval_seconds == 5
    assert defs.resources["pipes_pubsub"].detached_reply_topic == detached_topic


def test_single_session_materializes_with_the_partition_and_tags_in_the_payload(defs: Definitions) -> None:
    assets = defs.resolve_assets_def(AssetKey(["component", "single"]))
    with DagsterInstance.ephemeral() as instance:
        result = materialize([assets], instance=instance, partition_key="south", tags={"who": "tester"})
    assert result.success
    (metadata,) = materialization_metadata(result)
    assert metadata["n"] == 7
    assert metadata["payload_sha256"] == sha256_json({"n": 7, "region": "south", "requested_by": "tester"})
    assert metadata["pipes_session_id"]


def test_fan_out_over_declared_items(defs: Definitions) -> None:
    assets = defs.resolve_assets_def(AssetKey(["component", "fanned"]))
    with DagsterInstance.ephemeral() as instance:
        result = materialize([assets], instance=instance)
    assert result.success
    (metadata,) = materialization_metadata(result)
    assert metadata["pipes_shard_count"] == 3
    shards = sorted(metadata["pipes_shards"], key=lambda s: s["shard"])
    assert [s["n"] for s in shards] == [10, 20, 30]
    assert [s["payload_sha256"] for s in shards] == [
        sha256_json({"n": n, "shard_index": i}) for i, n in enumerate((10, 20, 30))
    ]


def test_a_fan_out_check_is_one_result_failed_by_any_shard(defs: Definitions) -> None:
    """Before, mode fan_out refused checks: the shards' reports were dropped from the step's results."""
    assets = defs.resolve_assets_def(AssetKey(["component", "fanned_checked"]))
    with DagsterInstance.ephemeral() as instance:
        result = materialize([assets], instance=instance, raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "positive" and evaluation.passed is False
    assert evaluation.metadata["pipes_failed_shards"].value == [1]
    assert evaluation.metadata["pipes_shards_passed"].value == 2


def test_fan_out_over_the_runs_partition_range(defs: Definitions) -> None:
    assets = defs.resolve_assets_def(AssetKey(["component", "ranged"]))
    tags = {ASSET_PARTITION_RANGE_START_TAG: "p2", ASSET_PARTITION_RANGE_END_TAG: "p4"}
    with DagsterInstance.ephemeral() as instance:
        result = materialize([assets], instance=instance, tags=tags)
        assert result.success
        recorded = instance.get_materialized_partitions(AssetKey(["component", "ranged"]))
    assert recorded == {"p2", "p3", "p4"}  # one run, one session per partition
    shards = sorted(materialization_metadata(result)[0]["pipes_shards"], key=lambda s: s["shard"])
    assert [s["payload_sha256"] for s in shards] == [sha256_json({"part": p}) for p in ("p2", "p3", "p4")]


@retry(stop=stop_after_delay(60), wait=wait_fixed(0.5), retry=retry_if_result(lambda result: result is None))
def recording_tick(sensor: SensorDefinition, client: Any, instance: DagsterInstance) -> SensorResult | None:
    """Tick the sensor until it records what the (detached) function reported."""
    result = sensor(build_sensor_context(instance=instance, resources={"pipes_pubsub": client}))
    return result if isinstance(result, SensorResult) and result.asset_events else None


def test_detached_job_and_its_completion_sensor_record_the_materialization(defs: Definitions) -> None:
    client = defs.resources["pipes_pubsub"]
    sensor = defs.resolve_sensor_def("later_completions")
    with DagsterInstance.ephemeral() as instance:
        run = defs.resolve_job_def("later_job").execute_in_process(instance=instance)
        assert run.success
        assert instance.get_latest_materialization_event(AssetKey(["component", "later"])) is None
        recorded = recording_tick(sensor, client, instance)
        # the next tick, with the cursor the daemon saved, acks the replies and removes the session's objects
        sensor(build_sensor_context(instance=instance, cursor=recorded.cursor, resources={"pipes_pubsub": client}))
        (event,) = recorded.asset_events
    assert session_objects(client.project or os.environ["GOOGLE_CLOUD_PROJECT"], prefix=f"{client.prefix}/") == []
    assert event.asset_key == AssetKey(["component", "later"])
    assert event.metadata["n"].value == 4
    assert event.metadata["payload_sha256"].value == sha256_json({"n": 4, "log_lines": 2})


def test_a_detached_partitioned_instance_records_the_materialization_on_the_runs_partition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, project_env: None
) -> None:
    """The payload sees the run's partition, and the completion sensor records the function's
    materialization on it (before: partition None, and no partition of the asset materialized)."""
    parted = CLIENT + """\
  detached_reply_topic: "{{ env.CT_DETACHED_TOPIC }}"
  assets:
    - key: component/parted
      partitions_def: {type: static, partition_keys: [p1, p2, p3]}
  mode: detached
  detached:
    subscription: "{{ env.CT_DETACHED_SUBSCRIPTION }}"
  payload:
    n: 4
    part: "{{ partition_key }}"
"""
    write_project(tmp_path, {"parted": parted})
    defs = load(tmp_path, monkeypatch)
    client = defs.resources["pipes_pubsub"]
    key = AssetKey(["component", "parted"])
    with DagsterInstance.ephemeral() as instance:
        run = defs.resolve_job_def("parted_job").execute_in_process(instance=instance, partition_key="p2")
        assert run.success
        sensor = defs.resolve_sensor_def("parted_completions")
        recorded = recording_tick(sensor, client, instance)
        (event,) = recorded.asset_events
        assert event.asset_key == key and event.partition == "p2"
        assert event.metadata["payload_sha256"].value == sha256_json({"n": 4, "part": "p2"})
        instance.report_runless_asset_event(event)  # as the daemon writes it
        assert instance.get_materialized_partitions(key) == {"p2"}
        sensor(build_sensor_context(instance=instance, cursor=recorded.cursor, resources={"pipes_pubsub": client}))


# --- invalid instances --------------------------------------------------------------------------------------


def load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attributes: str) -> str:
    """The error chain of loading a defs folder with one instance, as one text."""
    write_project(tmp_path, {"bad": attributes})
    with pytest.raises(Exception) as raised:
        load(tmp_path, monkeypatch)
    texts, error = [], raised.value
    while error is not None:
        texts.append(str(error))
        error = error.__cause__
    return "\n".join(texts)


VALID = CLIENT + "  assets:\n    - key: fine\n"


@pytest.mark.parametrize(
    "attributes, where, message",
    [
        (
            VALID.replace("trigger_topic", "tigger_topic"),
            "attributes.tigger_topic at {path}:3",
            "Extra inputs are not permitted",
        ),
        (
            VALID.replace('  trigger_topic: "{{ env.CT_TRIGGER_TOPIC }}"\n', ""),
            "attributes at {path}:2",
            "trigger_topic or function_name is required",
        ),
        (
            VALID.replace("key: fine", "key: sales data!"),
            "attributes.assets.0.key at {path}:10",
            "asset key 'sales data!'",
        ),
        (
            VALID + "  payload:\n    day: '{{ partition_date }}'\n",
            "{path}:11 - attributes.payload",
            "uses partition_date",
        ),
        (VALID + "  mode: fan_out\n", "attributes.mode at {path}:11", "mode fan_out needs fan_out"),
    ],
    ids=["unknown attribute", "missing topic", "bad asset key", "unknown template name", "fan-out without shards"],
)
def test_invalid_instance_fails_at_load_naming_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, project_env: None, attributes: str, where: str, message: str
) -> None:
    error = load_error(tmp_path, monkeypatch, attributes)
    path = next(tmp_path.glob("cfproj_*/defs/bad/defs.yaml"))
    assert where.format(path=path) in error
    assert message in error


def dg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "NO_COLOR": "1"}
    return subprocess.run([DG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    "attributes, where, message",
    [
        (VALID.replace("reply_topic", "replies_topic"), "defs.yaml:4", "'replies_topic' was unexpected"),
        (VALID.replace("trigger_topic", "# trigger_topic"), "defs.yaml:2", "'trigger_topic' is a required property"),
    ],
    ids=["unknown attribute", "missing topic"],
)
def test_dg_check_yaml_names_the_attribute(tmp_path: Path, attributes: str, where: str, message: str) -> None:
    # one instance a project: dg 1.13.27 checks only the last instance of each component type it finds
    write_project(tmp_path, {"bad": attributes})
    checked = dg("check", "yaml", cwd=tmp_path)
    assert checked.returncode != 0
    output = checked.stdout + checked.stderr
    assert f"bad/{where}" in output and message in output, output


def test_dg_lists_and_scaffolds_the_component(tmp_path: Path) -> None:
    write_project(tmp_path, {})
    listed = dg("list", "components", "--json", cwd=tmp_path)
    assert TYPE in [entry["key"] for entry in json.loads(listed.stdout)["items"]], listed.stderr
    scaffolded = dg("scaffold", "defs", TYPE, "my_function", cwd=tmp_path)
    assert scaffolded.returncode == 0, scaffolded.stderr
    (written,) = tmp_path.glob("cfproj_*/defs/my_function/defs.yaml")
    assert f"type: {TYPE}" in written.read_text()
    assert "key: my_function" in written.read_text()
    assert dg("check", "yaml", cwd=tmp_path).returncode == 0


def test_docs_attributes_table_matches_the_schema() -> None:
    table = attributes_table()
    assert table in (REPO / "docs" / "component.md").read_text(), (
        f"docs/component.md's attributes table differs from the component's schema; replace it with:\n\n{table}"
    )


def test_example_code_location_merges_its_defs_folder() -> None:
    listed = dg("list", "defs", "--json", cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    keys = {asset["asset_key"]: asset for asset in json.loads(listed.stdout)["assets"]}
    assert {"cloud_function_pipes_asset", "yaml_sales"} <= set(keys)  # the Python example and the YAML instance
    assert keys["yaml_sales"]["source"].startswith("examples/sales/defs/yaml_sales/defs.yaml:")
    assert sorted(keys["yaml_sales"]["kinds"]) == ["cloud-functions", "gcp"]


def test_component_built_in_python_is_checked_too() -> None:
    with pytest.raises(Exception, match="trigger_topic or function_name is required"):
        CloudFunctionComponent(bucket="b", assets=[])  # type: ignore[call-arg]
