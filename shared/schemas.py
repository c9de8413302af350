"""The JSON Schemas (draft 2020-12) of wire protocol v1, shipped in ``shared/schemas/``: the trigger, the reply
envelope and its attributes, each Pipes message, the session lease and the claim-check pointer. They are the
machine-readable half of ``docs/protocol.md``, for another implementation of either side to validate against.

Nothing here validates (``shared`` imports only the standard library and Google's clients): the tests check
what the Python side sends and accepts against these files with ``jsonschema``. A schema's ``$id`` is an
identifier under ``SCHEMA_BASE``, not a location: its ``$ref``s name sibling files, so register every file
under its ``$id`` (``all_schemas()``) before validating one.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

#: the base of every schema's ``$id`` (the ``.invalid`` top-level domain never resolves: load the files)
SCHEMA_BASE = "https://dagster-gcf-pipes.invalid/protocol/v1/"


def schema_names() -> list[str]:
    """The file names in ``shared/schemas/``, sorted (``trigger-data.json``, ...)."""
    folder = resources.files(__package__).joinpath("schemas")
    return sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".json"))


def load_schema(name: str) -> dict[str, Any]:
    """The schema in ``shared/schemas/NAME`` (``.json`` may be left off)."""
    file_name = name if name.endswith(".json") else f"{name}.json"
    if file_name not in schema_names():
        raise ValueError(f"no protocol schema {file_name!r}; the schemas are {schema_names()}")
    return json.loads(resources.files(__package__).joinpath("schemas", file_name).read_text(encoding="utf-8"))


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every schema by its ``$id``: what a validator's registry needs to follow the cross-file ``$ref``s."""
    schemas = (load_schema(name) for name in schema_names())
    return {schema["$id"]: schema for schema in schemas}
