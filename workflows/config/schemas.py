"""The JSON Schemas of the project's files, generated from their models and shipped in `schemas/`.

    python -m workflows.config.schemas        # regenerate after changing a model (a test checks they agree)

YAML configs point editors at theirs with `# yaml-language-server: $schema=...`."""
from __future__ import annotations

import json
from pathlib import Path

from tarflow import Plan, SamplingSpec
from tarflow.profile import Profile
from tarflow.schema import json_schema

from .nightly import NightlyConfig
from .run import RunConfig
from .stages import GenerateConfig

SCHEMA_DIR = Path(__file__).parent / "schemas"
MODELS = {"run-config": RunConfig, "nightly-config": NightlyConfig, "generate-config": GenerateConfig,
          "sampling-spec": SamplingSpec, "plan": Plan, "profile": Profile}


def schema_text(name: str) -> str:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **json_schema(MODELS[name])}
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in MODELS:
        path = directory / f"{name}.schema.json"
        path.write_text(schema_text(name))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_schemas():
        print(p)
