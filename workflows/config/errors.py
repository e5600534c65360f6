"""Reading YAML configs into their models, with errors that name the file and the field."""
from __future__ import annotations

import collections.abc

import yaml

from tarflow.schema import MAX_NESTING, SchemaError, check_nesting, input_file, validate


class ConfigError(SchemaError):
    """A config that cannot run: the message names the file, the field and the allowed values."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data, no tags that build objects) refusing a key given twice in one
    mapping, where it would keep the last silently: a config means what its reader sees first."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):
                continue  # PyYAML's own construct_mapping names an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(tp, path, what: str):
    """The YAML file `path` as an instance of the model `tp`."""
    path = input_file(path, what)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {what} is not valid YAML ({e})") from None
    except RecursionError:  # PyYAML composes nested nodes recursively: far beyond the bound
        raise ConfigError(f"{path}: {what} nests lists and mappings more than {MAX_NESTING} deep") from None
    check_nesting(data, f"{path}: {what}", ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of sections, got {type(data).__name__}")
    try:
        return validate(tp, data, "", ConfigError)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
