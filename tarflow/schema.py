"""JSON forms of the project's typed objects: one validator for every file and config that comes in.

The types themselves are plain dataclasses, so the model and solvers need torch alone; their
`__post_init__` checks values (ranges, cross-field rules). When JSON or YAML comes in, pydantic v2
(imported here, lazily) checks the types against the annotations, refuses unknown fields, accepts
numbers written as strings (`1e-3` from YAML), and `__post_init__` runs on what it built. Every
error is reported with its dotted field path, one line each, as a `SchemaError`.

Dataclasses opt in with `__pydantic_config__ = STRICT_FIELDS`. A check in `__post_init__` raises a
`SchemaError` with the bad field's path relative to its object and the value; pydantic's error keeps
that exception, and `validate` puts the object's own path in front::

    raise PlanError("must be a positive integer", loc="segment_len", value=16)  # or loc=("blocks", 0, "tol")
    # alone: "segment_len=16: must be a positive integer"; in a plan file: "plan.blocks[2].segment_len=16: ..."

A number's rule is one helper (`check_int`, `check_finite`), so every field states it in the same words.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from pathlib import Path
from typing import NamedTuple

from .atomic import write_atomic

# unknown fields are errors; NaN and inf are never valid numbers in a config or a plan. No protected
# namespaces: pydantic before 2.10 reserves the `model_` prefix and warns at import on `model_hash`
STRICT_FIELDS = {"extra": "forbid", "allow_inf_nan": False, "protected_namespaces": ()}
# the deepest nesting of lists and objects a file may have: the project's own files nest at most 6 deep;
# a file nested deeper is refused before a recursive reader (Python's json, PyYAML, pydantic) can
# exhaust the stack on it
MAX_NESTING = 32
_UNSHOWN = object()  # a check that does not show the value


class FieldError(NamedTuple):
    """One bad field: `loc` its path, `detail` what is wrong, `value` the value as the message shows it
    (None: not shown), `sep` what joins path and detail when no value is shown."""

    loc: tuple
    detail: str
    value: str | None = None
    sep: str = ": "

    def line(self, what: str = "") -> str:
        """`what.loc=value: detail`; without a value `what.loc: detail`, or `what.loc detail` where the
        detail goes on from the field's name (`blocks has 3 entries ...`)."""
        where = (what + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.loc)).lstrip(".")
        if not where:
            return self.reason
        return f"{where}={self.value}: {self.detail}" if self.value is not None else f"{where}{self.sep}{self.detail}"

    @property
    def reason(self) -> str:
        """What is wrong, without the path: what an option that gave the value reports."""
        return self.detail if self.value is None else f"{self.value}: {self.detail}"


class SchemaError(ValueError):
    """Input that does not fit its schema.

    A check raises it as `SchemaError(detail, loc, value)`: `loc` the bad field's name, or its path from the
    object checked (`("guidance", "scale")`); `value` shown as its repr. Without a value the detail goes on
    from the field's name (`"has 3 entries ..."`), or follows it after `sep` (`": "`); without a loc it is
    the whole message. `fields` holds every bad field found (several where `validate` found them), `loc`
    the path of the one it names."""

    def __init__(self, detail: str, loc: str | tuple = (), value=_UNSHOWN, sep: str = " "):
        loc = (loc,) if isinstance(loc, str) else tuple(loc)
        shown = None if value is _UNSHOWN else repr(value)
        self.fields = [FieldError(loc, detail, shown, sep if loc else ": ")]
        super().__init__(self.fields[0].line())

    @property
    def loc(self) -> tuple:
        return self.fields[0].loc if len(self.fields) == 1 else ()


def check_int(value, loc, low: int = 1, high: int | None = None, optional: bool = False,
              error: type[SchemaError] = SchemaError):
    """`value` if it is an integer in [low, high] (or None, where `optional`); else `error` at `loc` giving
    the rule: `must be a positive integer`, `an integer >= 0`, `an integer in [1, 65536]` (`or null`)."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
            or (high is not None and value > high):
        rule = f"an integer in [{low}, {high}]" if high is not None else \
            "a positive integer" if low == 1 else f"an integer >= {low}"
        raise error(f"must be {rule}{' or null' if optional else ''}", loc, value)
    return value


def check_finite(value, loc, low: float = 0.0, strict: bool = False, optional: bool = False,
                 error: type[SchemaError] = SchemaError):
    """`value` if it is a finite number >= low (> low where `strict`; or None, where `optional`); else
    `error` at `loc` giving the rule: `must be a finite number >= 0` (`> 0`, `or null`)."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (value <= low if strict else value < low):
        raise error(f"must be a finite number {'>' if strict else '>='} {low:g}{' or null' if optional else ''}",
                    loc, value)
    return value


def forget_types() -> None:
    """Drop the validators built so far: a type they were built from has changed (a solver registered)."""
    _adapter.cache_clear()


@functools.cache
def _adapter(tp):
    from pydantic import TypeAdapter

    return TypeAdapter(tp)


def validate(tp, data, what: str, error: type[SchemaError] = SchemaError):
    """`data` (parsed JSON/YAML) as an instance of `tp`, or `error` listing every bad field as `what.path`."""
    from pydantic import ValidationError

    try:
        return _adapter(tp).validate_python(data)
    except ValidationError as e:
        fields = field_errors(e, tp)
        found = error("; ".join(f.line(what) for f in fields))
        found.fields = fields
        raise found from None


def describe(e, tp, what: str) -> str:
    """One line per bad field of a pydantic ValidationError: `what.a.b[2].c: message (got value)`, or a
    check's own `what.a.b[2].c=value: detail`."""
    return "; ".join(f.line(what) for f in field_errors(e, tp))


def field_errors(e, tp) -> list[FieldError]:
    """Each bad field of a pydantic ValidationError, its path as the file reads (union tags left out). A
    SchemaError raised by a check brings its own fields, put under the object that raised it: what lets a
    command name the option that gave the value."""
    out = []
    for err in e.errors(include_url=False):
        loc, path = _strip_tags(tp, err["loc"])
        raised = err.get("ctx", {}).get("error")
        if isinstance(raised, SchemaError):
            out += [f._replace(loc=path + f.loc) for f in raised.fields]
            continue
        message = str(raised) if err["type"] == "value_error" and isinstance(raised, Exception) else err["msg"]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path += (str(err.get("ctx", {}).get("discriminator", "")).strip("'"),)
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            allowed = _field_names(tp, loc[:-1])
            message = "unknown field" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        elif err["type"] != "value_error" and "input" in err and not isinstance(err["input"], (dict, list)):
            message += f" (got {err['input']!r})"
        out.append(FieldError(path, message))
    return out


def _members(tp) -> list:
    """The alternatives of a (possibly Annotated / Optional) union, or [tp]."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for m in typing.get_args(tp) if m is not type(None)]
    if isinstance(tp, type) and "registered" in vars(tp):  # a class pydantic reads as the union of a registry
        return tp.registered()
    return [tp]


def _child(tp, key):
    """The type found one step down `tp` at `key` (field name, list index or union tag), or None."""
    for member in _members(tp):
        origin = typing.get_origin(member)
        if dataclasses.is_dataclass(member):
            hints = typing.get_type_hints(member, include_extras=True)
            if key in hints:
                return hints[key]
        elif hasattr(member, "model_fields") and key in member.model_fields:
            return member.model_fields[key].annotation
        elif origin in (list, tuple) and isinstance(key, int):
            return typing.get_args(member)[0]
        elif origin is dict:
            return typing.get_args(member)[1]
    return None


def _tag_member(tp, key):
    """The union member a discriminator tag names (pydantic puts the tag into error locations)."""
    for member in _members(tp):
        hints = typing.get_type_hints(member) if dataclasses.is_dataclass(member) else {}
        tag = hints.get("solver")
        if tag is not None and key in typing.get_args(tag):
            return member
    return None


def _strip_tags(tp, loc) -> tuple[tuple, tuple]:
    """(loc with union tags kept, loc without them) so paths read as the file does."""
    path, current = [], tp
    for key in loc:
        member = _tag_member(current, key) if len(_members(current)) > 1 else None
        if member is not None:
            current = member
            continue
        path.append(key)
        current = _child(current, key) if current is not None else None
    return tuple(loc), tuple(path)


REQUIRED = object()  # the default of a field that has none


def field_spec(tp, path: tuple) -> tuple[object, object]:
    """(annotation, default) of the field at `path` under the dataclass or pydantic model `tp`; the default is
    REQUIRED where the field has none. What lets a command line take its options' types, choices and
    defaults from the types they fill."""
    for key in path[:-1]:
        tp = _members(_child(tp, key))[0]
    name = path[-1]
    if dataclasses.is_dataclass(tp):
        f = {f.name: f for f in dataclasses.fields(tp)}[name]
        default = f.default if f.default is not dataclasses.MISSING else \
            f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED
        return typing.get_type_hints(tp, include_extras=True)[name], default
    info = tp.model_fields[name]
    return info.annotation, REQUIRED if info.is_required() else info.get_default(call_default_factory=True)


def input_file(path, what: str) -> Path:
    """`path` as a Path if it is a file; else FileNotFoundError `{what} not found: ...` or IsADirectoryError."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory; give the file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _field_names(tp, loc) -> list[str]:
    current = tp
    for key in loc:
        member = _tag_member(current, key) if current is not None and len(_members(current)) > 1 else None
        current = member if member is not None else (_child(current, key) if current is not None else None)
    names = []
    for member in _members(current) if current is not None else []:
        if dataclasses.is_dataclass(member):
            names += [f.name for f in dataclasses.fields(member)]
        elif hasattr(member, "model_fields"):
            names += list(member.model_fields)
    return list(dict.fromkeys(names))


def to_dict(obj) -> dict:
    """The JSON-ready form of a dataclass instance (nested dataclasses as objects, tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def to_json(obj, indent: int | None = 1) -> str:
    return json.dumps(to_dict(obj), indent=indent, sort_keys=True)


def json_schema(tp) -> dict:
    """The JSON Schema of `tp`, as pydantic derives it from the annotations."""
    return _adapter(tp).json_schema()


def check_nesting(data, what: str, error: type[Exception] = SchemaError):
    """`data` (parsed JSON or YAML) if it nests at most MAX_NESTING lists and objects deep, else `error`.
    Walked with a stack of its own (a reader that recursed would be what the bound protects), each
    container once per depth it is reached at: YAML aliases share one container among many places,
    and an alias bomb is small as shared containers, vast as a tree."""
    stack, seen = [(data, 1)], {}
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, (dict, list)) or seen.get(id(value), 0) >= depth:
            continue
        if depth > MAX_NESTING:
            raise error(f"{what} nests lists and objects more than {MAX_NESTING} deep: not a file this project "
                        "writes")
        seen[id(value)] = depth
        stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return data


def parse_json(text: str | bytes, what: str, error: type[Exception] = SchemaError):
    """The value of a JSON text, nested at most MAX_NESTING deep; anything else is `error` naming `what`.
    Every JSON the project reads comes through here."""
    try:
        data = json.loads(text)
    except RecursionError:  # deeper than the interpreter's stack: far beyond the bound
        raise error(f"{what} nests lists and objects more than {MAX_NESTING} deep: not a file this project "
                    "writes") from None
    except (ValueError, TypeError) as e:  # not JSON, not UTF-8, or not text at all
        raise error(f"{what} is not valid JSON ({e})") from None
    return check_nesting(data, what, error)


def loads(tp, text: str, what: str, error: type[SchemaError] = SchemaError):
    return validate(tp, parse_json(text, what, error), what, error)


def load(tp, path, what: str, error: type[SchemaError] = SchemaError):
    """Read and validate a JSON file; a missing file is a FileNotFoundError, a bad one `error` naming it."""
    path = input_file(path, what)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read the {what} ({e})") from None
    try:
        return loads(tp, text, what, error)
    except error as e:
        raise error(f"{path}: {e}") from None


def save(obj, path) -> Path:
    """Write `obj` as JSON atomically (a crash leaves the old file or none, never half a file)."""
    text = to_json(obj) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text))


class JSONForm:
    """The JSON form of a dataclass: `from_dict` / `from_json` / `load` validate (errors are the class's
    `json_error`, paths start at `json_name`), `to_dict` / `to_json` / `save` write it."""

    json_name = "object"
    json_error: type[SchemaError] = SchemaError

    @classmethod
    def from_dict(cls, d):
        return validate(cls, d, cls.json_name, cls.json_error)

    @classmethod
    def from_json(cls, text: str):
        return loads(cls, text, cls.json_name, cls.json_error)

    @classmethod
    def load(cls, path):
        return load(cls, path, cls.json_name, cls.json_error)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        return to_json(self)

    def save(self, path) -> Path:
        return save(self, path)
