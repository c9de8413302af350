"""``CloudFunctionComponent``: a function-backed asset declared in a ``defs.yaml`` instead of Python.

A thin YAML front end to the Python API, which stays the reference: the component builds a
``PipesPubSubClient`` resource from its attributes and, by ``mode``,

* ``single``: a multi-asset whose step runs one session (``PipesPubSubClient.run``);
* ``fan_out``: a multi-asset whose step runs one session per declared item, or per partition of the run's
  partition range, at ``max_concurrency`` (``PipesPubSubClient.run_many``);
* ``detached``: the assets as specs, a job whose op only triggers the function
  (``PipesPubSubClient.run_detached``) and the ``pipes_completion_sensor`` that records what it reports.

The payload is rendered at run time with Dagster's own template engine (the one that renders
``{{ env.X }}``), with the run's partition key, partition key range, tags and id, and in a fan-out the
shard's item, in scope. Unknown names in it fail at load time, with the file and line.

``attributes_table()`` writes the attributes table of docs/component.md from the schema (a test compares them).
"""

import re
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import Annotated, Any, Literal

import jinja2
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    BackfillPolicy,
    DefaultSensorStatus,
    Definitions,
    EnvVar,
    OpExecutionContext,
    Output,
    PartitionsDefinition,
    job,
    multi_asset,
    op,
)
from dagster._core.definitions.utils import VALID_NAME_REGEX_STR, is_valid_name
from dagster.components import (
    Component,
    ComponentLoadContext,
    Model,
    ResolutionContext,
    Resolvable,
    ResolvedAssetCheckSpec,
    ResolvedAssetSpec,
    Resolver,
    Scaffolder,
    ScaffoldRequest,
    scaffold_component,
    scaffold_with,
)
from dagster.components.resolved.scopes import DeprecatedScope
from jinja2 import meta
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from dagster_gcf_pipes.orchestrator.client.client import PipesPubSubClient
from dagster_gcf_pipes.orchestrator.definitions.completion_sensor import pipes_completion_sensor

#: What the assets look like in the UI when ``kinds`` is not set.
DEFAULT_KINDS = ("gcp", "cloud-functions")

#: The completion sensor reads its client from this resource key, so a detached instance provides it.
DETACHED_RESOURCE_KEY = "pipes_pubsub"

#: Names the payload may use besides the load-time scope (env, dg, datetime, context, template vars).
RUN_SCOPE_NAMES = ("partition_key", "partition_key_range", "run_tags", "run_id", "item", "shard")

#: PipesPubSubClient settings that are not attributes: the earlier design's HTTP invocation and GCS reply
#: channel stay in Python (a migration path, not a way to declare new assets), and the signing secret is
#: read from the environment variable named by ``signing_secret_env_var`` so it never shows in the UI.
CLIENT_SETTINGS_NOT_IN_YAML = frozenset(
    {"invocation", "function_url", "http_timeout", "http_auth", "reply_channel", "chunk_interval", "signing_secret"}
)


def described(annotation: Any, description: str | None) -> Any:
    """``annotation`` with its description in the YAML schema (where dg shows it, and the docs' table)."""
    return Annotated[annotation, Resolver.default(description=description)]


def _client_settings_model() -> type[BaseModel]:
    """The client's settings as attributes: the same names, types, defaults and descriptions, so the YAML
    schema follows PipesPubSubClient as it grows."""
    fields: dict[str, Any] = {
        name: (described(info.annotation, info.description), ... if info.is_required() else info.default)
        for name, info in PipesPubSubClient.model_fields.items()
        if name not in CLIENT_SETTINGS_NOT_IN_YAML
    }
    return create_model("PipesPubSubSettings", __base__=Model, **fields)


PipesPubSubSettings = _client_settings_model()


class PayloadTemplate:
    """The payload as written in YAML, rendered per session at run time with the load-time context (so
    errors point at the file and line, and ``{{ env.X }}`` reads the environment of the run)."""

    def __init__(self, template: Mapping[str, Any], context: ResolutionContext | None = None):
        self.template = template
        self.context = context

    def render(self, **run_scope: Any) -> dict[str, Any]:
        context = self.context or ResolutionContext.default()
        return dict(context.with_scope(**run_scope).resolve_value(dict(self.template)))


def _template_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _template_strings(key)
            yield from _template_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _template_strings(item)


def _current_names(context: ResolutionContext) -> list[str]:
    return sorted(name for name, value in context.scope.items() if not isinstance(value, DeprecatedScope))


def _resolve_payload(context: ResolutionContext, template: Any) -> PayloadTemplate:
    """Check the payload's templates against the names it will have at run time; render nothing yet."""
    if not isinstance(template, Mapping):
        raise TypeError(f"payload must be a mapping (a JSON object), got {type(template).__name__}")
    known = set(context.scope) | set(RUN_SCOPE_NAMES)
    environment = jinja2.Environment()
    for text in _template_strings(template):
        unknown = meta.find_undeclared_variables(environment.parse(text)) - known
        if unknown:
            raise ValueError(
                f"payload template {text!r} uses {', '.join(sorted(unknown))}: the payload may use "
                f"{', '.join(RUN_SCOPE_NAMES)} and the load-time scope ({', '.join(_current_names(context))})"
            )
    return PayloadTemplate(template, context)


ResolvedPayload = Annotated[
    PayloadTemplate,
    Resolver(
        _resolve_payload,
        model_field_type=dict[str, Any],
        inject_before_resolve=False,
        description="The payload each session's handler receives (a JSON object), rendered at run time: "
        "`{{ partition_key }}`, `{{ partition_key_range.start }}` / `.end`, `{{ run_tags['k'] }}`, `{{ run_id }}`, "
        "in a fan-out `{{ item }}` and `{{ shard }}`, and `{{ env.X }}`.",
        examples=[{"day": "{{ partition_key }}", "requested_by": "{{ run_tags.get('user', '') }}"}],
    ),
]


class FanOut(Resolvable, Model):
    """One session per item of ``items``, or per partition key of the run's range (``partition_range``)."""

    items: described(
        list[Any] | None, "One shard per item; the payload sees it as `{{ item }}` and its index as `{{ shard }}`."
    ) = None
    partition_range: described(
        bool,
        "One shard per partition key of the run's range (a backfill runs as one run); the payload sees each as "
        "`{{ partition_key }}`.",
    ) = False
    max_concurrency: described(int, "At most this many sessions at once.") = Field(default=10, ge=1)
    shard_retries: described(int, "A failed shard is retried this many times, each time as a new session.") = Field(
        default=0, ge=0
    )


class Detached(Resolvable, Model):
    """The completion sensor created for a detached instance."""

    subscription: described(str, "The durable subscription on detached_reply_topic the completion sensor pulls.")
    minimum_interval_seconds: described(int, "Seconds between the sensor's ticks.") = Field(default=30, ge=1)
    running: described(bool, "Start the sensor running (default: stopped until turned on in the UI).") = False


#: Where a problem is, as a path under ``attributes`` (() for the attributes as a whole), and what it is.
Problem = tuple[tuple[str | int, ...], str]


def config_problems(attributes: Any) -> list[Problem]:
    """What is wrong across attributes, for the YAML model (at load, each at its file and line) and for an
    instance built in Python alike: both carry the same attribute names."""
    problems: list[Problem] = []
    if not (attributes.trigger_topic or attributes.function_name):
        problems.append(
            (
                (),
                (
                    "trigger_topic or function_name is required: the topic the function is deployed with "
                    "(--trigger-topic), or projects/P/locations/L/functions/F to read it from the deployment"
                ),
            )
        )
    problems += _asset_key_problems(attributes.assets or [], attributes.checks or [])
    problems += _mode_problems(attributes)
    return problems


def _mode_problems(attributes: Any) -> list[Problem]:
    mode = attributes.mode
    problems: list[Problem] = []
    for block in ("fan_out", "detached"):
        if getattr(attributes, block) is not None and mode != block:
            problems.append(((block,), f"{block} is set but mode is {mode!r}: set mode: {block}, or remove {block}"))
    if mode == "fan_out":
        fan_out = attributes.fan_out
        if fan_out is None or bool(fan_out.items) == bool(fan_out.partition_range):
            problems.append(
                (("mode",), "mode fan_out needs fan_out with either items (a non-empty list) or partition_range: true")
            )
    if mode == "detached":
        if attributes.detached is None:
            problems.append(
                (("mode",), "mode detached needs detached.subscription (the completion sensor's subscription)")
            )
        if not attributes.detached_reply_topic:
            problems.append(
                (("mode",), "mode detached needs detached_reply_topic: the topic detached sessions reply to")
            )
    if mode == "detached" and attributes.checks:
        problems.append(
            (
                ("checks",),
                (
                    "checks need mode single or fan_out: a detached step returns before the function runs, so it "
                    "cannot return the function's check results"
                ),
            )
        )
    return problems


def _key_parts(key: Any) -> list[str] | None:
    """An asset key's parts, from YAML (``a/b``) or Python (AssetKey); None while still a template."""
    if isinstance(key, AssetKey):
        return list(key.path)
    if isinstance(key, str) and "{{" not in key:
        return list(AssetKey.from_user_string(key).path)
    return None


def _asset_key_problems(assets: Sequence[Any], checks: Sequence[Any]) -> list[Problem]:
    problems: list[Problem] = []
    declared = []
    for i, asset in enumerate(assets):
        parts = _key_parts(asset.key)
        declared.append(parts)
        if parts is not None and not all(is_valid_name(part) for part in parts):
            problems.append(
                (
                    ("assets", i, "key"),
                    (f"asset key {'/'.join(parts)!r}: each part (between /) must match {VALID_NAME_REGEX_STR}"),
                )
            )
    for i, check in enumerate(checks):
        parts = _key_parts(check.asset_key if isinstance(check, AssetCheckSpec) else check.asset)
        if parts is not None and parts not in declared:
            problems.append(
                (
                    ("checks", i, "asset"),
                    (
                        f"check {check.name!r} is on {'/'.join(parts)!r}, which is not one of the assets: the "
                        "function reports checks on the assets it materializes"
                    ),
                )
            )
    return problems


def _check(attributes: Any) -> Any:
    """Raise every problem at once, each at its path (dg turns the paths into file and line)."""
    problems = config_problems(attributes)
    if problems:
        raise ValidationError.from_exception_data(
            type(attributes).__name__,
            [
                {"type": "value_error", "loc": loc, "input": None, "ctx": {"error": ValueError(text)}}
                for loc, text in problems
            ],
        )
    return attributes


def _scaffold_attributes(name: str) -> dict[str, Any]:
    return {
        "trigger_topic": "{{ env.PIPES_TRIGGER_TOPIC }}",
        "reply_topic": "{{ env.PIPES_REPLY_TOPIC }}",
        "bucket": "{{ env.PIPES_BUCKET }}",
        "assets": [{"key": name, "description": f"Written by the Cloud Function behind {name}."}],
        "payload": {"partition": "{{ partition_key }}"},
    }


class CloudFunctionScaffolder(Scaffolder):
    """``dg scaffold defs ...CloudFunctionComponent NAME``: a defs.yaml with the topics and bucket read from
    the environment and one asset named after the instance."""

    def scaffold(self, request: ScaffoldRequest) -> None:
        scaffold_component(request, _scaffold_attributes(_dagster_name(request.target_path.name)))


def _dagster_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


@scaffold_with(CloudFunctionScaffolder)
class CloudFunctionComponent(Component, Resolvable, PipesPubSubSettings):  # type: ignore[misc, valid-type]
    """Assets and asset checks a Google Cloud Function reports through Dagster Pipes over Pub/Sub.

    The function is deployed with ``--trigger-topic`` (``trigger_topic``, or ``function_name`` to read it
    from the deployment) and decorated with ``@pipes_function``; it replies on ``reply_topic``.

    Examples:
        .. code-block:: yaml

            type: dagster_gcf_pipes.orchestrator.CloudFunctionComponent
            attributes:
              trigger_topic: "{{ env.PIPES_TRIGGER_TOPIC }}"
              reply_topic: pipes-replies
              bucket: pipes-payloads
              assets:
                - key: daily_sales
                  partitions_def: {type: daily, start_date: "2026-01-01"}
              payload:
                day: "{{ partition_key }}"
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    assets: described(
        list[ResolvedAssetSpec],
        "The assets the function reports (key, deps, group_name, owners, kinds, partitions_def, "
        "automation_condition, ...); kinds default to gcp and cloud-functions.",
    )
    checks: described(
        list[ResolvedAssetCheckSpec] | None,
        "The asset checks the function reports (modes single and fan_out; in fan_out a check passes only if every "
        "shard that reports it passes).",
    ) = None
    payload: ResolvedPayload = PayloadTemplate({})
    mode: described(
        Literal["single", "fan_out", "detached"],
        "single: the step runs one session; fan_out: one session per shard (see fan_out); detached: a job "
        "triggers the function and returns, a completion sensor records the results (see detached).",
    ) = "single"
    fan_out: described(FanOut | None, "The shards, for mode fan_out.") = None
    detached: described(Detached | None, "The completion sensor, for mode detached.") = None
    name: described(
        str | None,
        "Name of the multi-asset (or of the detached op; its job and sensor are NAME_job and NAME_completions); "
        "default: the instance's folder name.",
    ) = None
    signing_secret_env_var: described(
        str | None,
        "Name of the environment variable holding the HMAC signing secret (its value never appears in YAML or "
        "in the UI); signing is off if unset.",
    ) = None

    @model_validator(mode="after")
    def check_attributes(self) -> "CloudFunctionComponent":
        return _check(self)

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        return _yaml_model(cls)

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        name = self.name or _dagster_name(context.path.name)
        client = self.client()
        specs = [_with_default_kinds(spec) for spec in self.assets]
        if self.mode == "detached":
            return self._detached_defs(name, client, specs)
        resource_key = f"pipes_pubsub_{name}"
        partition_range = self.fan_out is not None and self.fan_out.partition_range

        @multi_asset(
            name=name,
            specs=specs,
            check_specs=self.checks,
            required_resource_keys={resource_key},
            backfill_policy=BackfillPolicy.single_run() if partition_range else None,
        )
        def _function_assets(context: AssetExecutionContext) -> Iterator[Any]:
            session_client: PipesPubSubClient = getattr(context.resources, resource_key)
            if self.mode == "fan_out":
                yield from self._run_fan_out(context, session_client, specs)
            else:
                yield from session_client.run(context=context, payload=self._payload(context)).get_results()

        return Definitions(assets=[_function_assets], resources={resource_key: client})

    def client(self) -> PipesPubSubClient:
        """The resource the component's definitions use, from the client settings among the attributes."""
        settings = {name: getattr(self, name) for name in PipesPubSubSettings.model_fields}
        if self.signing_secret_env_var:
            settings["signing_secret"] = EnvVar(self.signing_secret_env_var)
        return PipesPubSubClient(**settings)

    def _payload(self, context: AssetExecutionContext | OpExecutionContext, **shard_scope: Any) -> dict[str, Any]:
        return self.payload.render(**{**run_scope(context), **shard_scope})

    def _run_fan_out(
        self, context: AssetExecutionContext, client: PipesPubSubClient, specs: Sequence[AssetSpec]
    ) -> Iterator[Any]:
        fan_out = self.fan_out
        assert fan_out is not None  # config_problems
        if fan_out.partition_range:
            payloads = [
                self._payload(context, partition_key=key, shard=i) for i, key in enumerate(context.partition_keys)
            ]
        else:
            payloads = [self._payload(context, item=item, shard=i) for i, item in enumerate(fan_out.items or [])]
        result = client.run_many(
            context=context,
            payloads=payloads,
            max_concurrency=fan_out.max_concurrency,
            shard_retries=fan_out.shard_retries,
        )
        for spec in specs:
            yield result.get_materialize_result(asset_key=spec.key)

    def _detached_defs(self, name: str, client: PipesPubSubClient, specs: Sequence[AssetSpec]) -> Definitions:
        detached = self.detached
        assert detached is not None  # config_problems
        asset_key = specs[0].key if len(specs) == 1 else None

        @op(
            name=name,
            description=f"Triggers the function for {', '.join(s.key.to_user_string() for s in specs)} and returns.",
        )
        def _trigger(context: OpExecutionContext, pipes_pubsub: PipesPubSubClient) -> Output[None]:
            session = pipes_pubsub.run_detached(context=context, payload=self._payload(context), asset_key=asset_key)
            return Output(None, metadata=session.metadata)

        @job(
            name=f"{name}_job",
            partitions_def=_shared_partitions(specs),
            description="Starts a detached function session.",
        )
        def _trigger_job() -> None:
            _trigger()

        sensor = pipes_completion_sensor(
            subscription=detached.subscription,
            name=f"{name}_completions",
            minimum_interval_seconds=detached.minimum_interval_seconds,
            default_status=DefaultSensorStatus.RUNNING if detached.running else DefaultSensorStatus.STOPPED,
        )
        return Definitions(
            assets=specs, jobs=[_trigger_job], sensors=[sensor], resources={DETACHED_RESOURCE_KEY: client}
        )


@cache
def _yaml_model(component: type["CloudFunctionComponent"]) -> type[BaseModel]:
    """The derived YAML model, plus the checks across attributes (at load, with dg's file-and-line errors)
    and, for ``dg check yaml`` (JSON schema only), the rule that a topic or a function name is required."""
    derived = component.model()
    schema_extra = {
        **(derived.model_config.get("json_schema_extra") or {}),  # type: ignore[dict-item]
        # without function_name, trigger_topic is required: jsonschema then names it in its message
        "if": {"not": {"required": ["function_name"]}},
        "then": {"required": ["trigger_topic"]},
    }

    class CloudFunctionComponentModel(derived):  # type: ignore[misc, valid-type]
        model_config = ConfigDict(**{**derived.model_config, "json_schema_extra": schema_extra})

        @model_validator(mode="after")
        def check_attributes(self) -> Any:
            return _check(self)

    return CloudFunctionComponentModel


def run_scope(context: AssetExecutionContext | OpExecutionContext) -> dict[str, Any]:
    """What a payload template sees of the run."""
    scope: dict[str, Any] = {
        "run_id": context.run_id,
        "run_tags": dict(context.run.tags),
        "partition_key": context.partition_key if context.has_partition_key else None,
        "partition_key_range": None,
        "item": None,
        "shard": None,
    }
    if context.has_partition_key_range:
        key_range = context.partition_key_range
        scope["partition_key_range"] = {"start": key_range.start, "end": key_range.end}
    return scope


def _with_default_kinds(spec: AssetSpec) -> AssetSpec:
    return spec if spec.kinds else spec.merge_attributes(kinds=set(DEFAULT_KINDS))


def _shared_partitions(specs: Sequence[AssetSpec]) -> PartitionsDefinition | None:
    partitions = {spec.partitions_def for spec in specs}
    if len(partitions) > 1:
        raise ValueError("assets: every asset of one instance must have the same partitions_def")
    return next(iter(partitions))


def _type_text(schema: Mapping[str, Any]) -> str:
    """A JSON schema type in a few words; the ``| string`` every attribute allows for templating is left out."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1].removesuffix("Model")
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    options = schema.get("anyOf")
    if options:
        non_template = [_type_text(o) for o in options if o.get("type") != "null"]
        texts = list(dict.fromkeys(t for t in non_template if t != "string")) or ["string"]
        return " \\| ".join(texts)
    if schema.get("type") == "array":
        return f"list of {_type_text(schema.get('items', {}))}"
    return str(schema.get("type", "any"))


def _default_text(spec: Mapping[str, Any], required: bool) -> str:
    if required:
        return "required"
    default = spec.get("default")
    return "" if default in (None, "__DAGSTER_UNSET_DEFAULT__") else f"`{default}`"


def attributes_table(model: type[BaseModel] | None = None) -> str:
    """The attributes table of docs/component.md, from the component's YAML schema (and its fan_out and
    detached blocks), so the docs cannot drift from the code."""
    model = model or CloudFunctionComponent.get_model_cls()
    schema = model.model_json_schema()
    sections = [("", schema)] + [
        (f"{name}.", schema["$defs"][definition])
        for name, definition in (("fan_out", "FanOutModel"), ("detached", "DetachedModel"))
    ]
    lines = ["| attribute | type | default | description |", "|---|---|---|---|"]
    for prefix, section in sections:
        required = set(section.get("required", ()))
        for name, spec in section["properties"].items():
            description = " ".join(str(spec.get("description", "")).split()).replace("|", "\\|")
            lines.append(
                f"| `{prefix}{name}` | {_type_text(spec)} | {_default_text(spec, name in required)} | {description} |"
            )
    return "\n".join(lines) + "\n"
