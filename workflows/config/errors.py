"""Reading YAML configs into their models, with errors that name the file and the field."""
from __future__ import annotations

from pathlib import Path

import yaml

from tarflow.schema import SchemaError, validate


class ConfigError(SchemaError):
    """A config that cannot run: the message names the file, the field and the allowed values."""


def load_yaml(tp, path, what: str):
    """The YAML file `path` as an instance of the model `tp`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {what} is not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of sections, got {type(data).__name__}")
    try:
        return validate(tp, data, "", ConfigError)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
