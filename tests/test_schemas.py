"""The shipped JSON Schemas are the ones the models generate, and the shipped configs validate against them."""
import json
from pathlib import Path

import jsonschema
import pydantic
import pytest
import yaml
from conftest import locked_versions

from tarflow import Plan
from workflows.config.schemas import MODELS, SCHEMA_DIR, schema_text

REPO = Path(__file__).resolve().parents[1]


# What pydantic releases write differently for one model: annotations (newer ones add dataclasses' docstrings),
# keywords that say what JSON Schema assumes anyway (additionalProperties: true), propertyNames of enum-keyed
# dicts (newer ones only), integers written as floats, and two spellings of one constraint: older ones add
# `enum: [c]` beside `const: c` and wrap a `$ref` that has siblings in a one-element `allOf`. None of it
# changes what a config means.
_GENERATOR_DIALECT = {"description", "title", "$comment", "propertyNames"}


def _meaning(schema):
    if isinstance(schema, dict):
        schema = dict(schema)
        if len(schema.get("allOf", ())) == 1:
            schema = {**schema.pop("allOf")[0], **schema}
        if "const" in schema and schema.get("enum") == [schema["const"]]:
            del schema["enum"]
        return {k: _meaning(v) for k, v in schema.items()
                if k not in _GENERATOR_DIALECT and not (k == "additionalProperties" and v is True)}
    if isinstance(schema, list):
        return [_meaning(v) for v in schema]
    return float(schema) if isinstance(schema, int) and not isinstance(schema, bool) else schema


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shipped_schema_is_current(name):
    """Exactly what the models generate under the lock's pydantic (the one the schemas are written with);
    under another release (the floors' run, a newer one), the same schema up to how that release writes it."""
    shipped = (SCHEMA_DIR / f"{name}.schema.json").read_text()
    hint = f"run `python -m workflows.config.schemas` to regenerate {name}"
    if pydantic.VERSION == locked_versions()["pydantic"]:
        assert shipped == schema_text(name), hint
    else:
        assert _meaning(json.loads(shipped)) == _meaning(json.loads(schema_text(name))), hint


def test_a_changed_model_is_caught_under_any_pydantic():
    """The comparison under another pydantic release still sees a field added, removed, retyped or re-bounded."""
    schema = json.loads(schema_text("plan"))
    assert _meaning(schema) == _meaning(json.loads(json.dumps(schema)))
    for change in ({"type": "object"}, {"minimum": -12345.0}, {"enum": ["not-a-value"]}):
        changed = json.loads(json.dumps(schema))
        block = next(iter(changed["$defs"].values()))
        field = next(iter(block["properties"].values()))
        field.update(change)
        assert _meaning(changed) != _meaning(schema), change


@pytest.mark.parametrize("config, schema", [
    *[(f"jobs/configs/{n}.yaml", "run-config")
      for n in ("demo", "afhq256", "imagenet64-uncond", "imagenet64", "imagenet128")],
    ("jobs/configs/nightly.yaml", "nightly-config"),
])
def test_shipped_configs_validate_against_their_schema(config, schema):
    text = (REPO / config).read_text()
    assert f"$schema=../../workflows/config/schemas/{schema}.schema.json" in text.splitlines()[0]
    jsonschema.validate(yaml.safe_load(text), json.loads((SCHEMA_DIR / f"{schema}.schema.json").read_text()))


def test_schema_refuses_what_the_model_refuses():
    """An editor using the schema flags the same mistakes: unknown fields, wrong enums, block fields of another solver."""
    run = json.loads((SCHEMA_DIR / "run-config.schema.json").read_text())
    for bad in ({"output": "x", "samplng": {}}, {"output": "x", "device": "tpu"},
                {"output": "x", "sampling": {"guidance": {"what": "c"}}}, {"output": "x", "samples": {"num_samples": 0}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, run)
    plan = json.loads((SCHEMA_DIR / "plan.schema.json").read_text())
    good = Plan.sequential(2, 16).to_dict()
    jsonschema.validate(good, plan)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "blocks": [{"solver": "sequential", "tol": 1e-3}, {"solver": "sequential"}]}, plan)


def _literal_block(doc: str) -> str:
    """The first literal block (the indented lines after `::`) of a docstring, dedented."""
    lines = []
    for line in doc.split("::\n", 1)[1].splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


def test_the_documented_examples_show_the_models_defaults():
    """The run config's YAML example and the sampling spec's JSON form, as their docstrings show them: every
    field, each with the default its model has (the run's name and output aside)."""
    import tarflow.spec
    from tarflow import SamplingSpec
    from workflows.config import RunConfig, run

    example = yaml.safe_load(_literal_block(run.__doc__))
    assert example == RunConfig(output=example["output"], name=example["name"]).model_dump(mode="json")
    assert json.loads(_literal_block(tarflow.spec.__doc__)) == SamplingSpec().to_dict()
