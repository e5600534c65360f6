"""The shipped JSON Schemas are the ones the models generate, and the shipped configs validate against them."""
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tarflow import Plan
from workflows.config.schemas import MODELS, SCHEMA_DIR, schema_text

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shipped_schema_is_current(name):
    shipped = (SCHEMA_DIR / f"{name}.schema.json").read_text()
    assert shipped == schema_text(name), f"run `python -m workflows.config.schemas` to regenerate {name}"


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
