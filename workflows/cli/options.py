"""Options derived from the types they fill: the sampling spec, a stage's resources, the model reference,
FID settings, a generate config. Each option takes its type, choices and default from its field, and its
value is checked by that type's own validation (the one files and configs go through), so a bad value
exits 2 naming the option, never 1 naming an internal field."""
from __future__ import annotations

import functools
import types
import typing

import click

from tarflow import ModelRef, SamplingSpec
from tarflow.schema import REQUIRED, SchemaError, field_spec, validate

from ..config import Resources


def _click_type(annotation):
    """click's type for a field's annotation: its Literal's choices, or int / float / str."""
    members = [m for m in typing.get_args(annotation) if m is not type(None)] \
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
    if len(members) == 1 and typing.get_origin(members[0]) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(members[0])])
    if len(members) == 1 and members[0] in (int, float, str):
        return members[0]
    raise TypeError(f"no click type for {annotation!r}: give type= (and a callback) to the option")


def field_option(tp, path: tuple, decl: str, help: str, name: str | None = None, **click_kwargs):
    """A click option filling the field at `path` of `tp` (a dataclass or pydantic model), passed to the
    command as `name` (default: click's from `decl`). `click_kwargs` override what the field says (a
    command's own default, a parsing callback)."""
    annotation, default = field_spec(tp, path)
    kwargs = {"default": None if default is REQUIRED else default, "required": default is REQUIRED,
              "show_default": default not in (REQUIRED, None), "help": help}
    if "/" not in decl and "type" not in click_kwargs:  # --annealed/--constant is a bool by click's syntax
        kwargs["type"] = _click_type(annotation)
    kwargs.update(click_kwargs)
    return click.option(decl, *([name] if name else []), **kwargs)


def _nest(values: dict[tuple, object]) -> dict:
    out: dict = {}
    for path, value in values.items():
        level = out
        for key in path[:-1]:
            level = level.setdefault(key, {})
        level[path[-1]] = value
    return out


def _hint(decl: str) -> str:
    return " / ".join(f"'{d}'" for d in decl.split("/"))


def build(tp, values: dict[tuple, object], options: dict[tuple, str]):
    """`tp` from the values of its fields (path -> value), validated as a file of it would be; an error in
    a field an option gave is a usage error naming that option (exit 2)."""
    try:
        return validate(tp, _nest(values), "", SchemaError)
    except SchemaError as e:
        raise_for_option(e, options)
        raise


def raise_for_option(e: SchemaError, options: dict[tuple, str]) -> None:
    """Raise click.BadParameter naming the option that gave a field `e` names (by each field's `loc`, or one
    above it: an option may give a whole list); return if no option gave one."""
    for found in e.fields:
        given = next((found.loc[:n] for n in range(len(found.loc), 0, -1) if found.loc[:n] in options), None)
        if given is not None:
            raise click.BadParameter(found.reason, param_hint=_hint(options[given])) from None


def options_for(tp, table: list[tuple[tuple, str, str]], dest: str, overrides: dict | None = None):
    """A decorator adding one option per (path, decl, help) of `table` (`overrides`: click settings per
    path); the command receives `dest`, the `tp` their values build, and a SchemaError naming one of those
    fields later in the command (a check against the model) names its option too."""
    overrides = overrides or {}
    options = {path: decl for path, decl, _ in table}
    names = {path: f"{dest}__{'__'.join(path)}" for path in options}

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {path: kwargs.pop(name) for path, name in names.items()}
            built = build(tp, values, options)
            try:
                return command(*args, **{dest: built}, **kwargs)
            except SchemaError as e:
                raise_for_option(e, options)
                raise

        for path, decl, text in reversed(table):
            wrapper = field_option(tp, path, decl, text, names[path], **overrides.get(path, {}))(wrapper)
        return wrapper
    return decorate


def parse_labels(ctx, param, value):
    """'uniform' | 'none' | comma-separated class ids (-1: unconditional) -> the spec's label policy."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("uniform", "none"):
        return text
    try:
        ids = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        ids = ()
    if not ids:
        raise click.BadParameter(f"{value!r}: give 'uniform', 'none', or class ids such as 3,5,7 (-1: unconditional)")
    return ids


SPEC_OPTIONS = [
    (("seed",), "--seed", "Run seed: sample i's noise comes from (seed, i)."),
    (("labels",), "--labels", "'uniform' (cycle all classes), 'none' (unconditional), or class ids '3,5,7' to cycle "
                              "(-1: unconditional). Default: uniform for a class-conditional model, else none."),
    (("guidance", "scale"), "--guidance", "Classifier-free guidance scale (0: off)."),
    (("guidance", "annealed"), "--annealed/--constant",
     "Guidance weight grows linearly over tokens, as the reference samples."),
    (("guidance", "attn_temp"), "--attn-temp", "Attention temperature of the unconditional guidance branch."),
    (("guidance", "what"), "--guide-what", "Guide the log-scale a, the shift b, or both."),
    (("denoise", "multiplier"), "--denoise", "Self-denoising step multiplier (1: Tweedie's step; 0: off)."),
    (("denoise", "noise_std"), "--noise-std", "The model's training noise, for --denoise (default: from the "
                                              "checkpoint)."),
    (("batch_size",), "--batch-size", "Samples per batch: the batch a plan is profiled, certified and run at."),
    (("autocast",), "--autocast", "The network's autocast dtype (iterates stay float32)."),
]


def spec_options(batch_size: int | None = 16):
    """Add the sampling-spec options to a command; the command receives `spec` (a SamplingSpec).
    `batch_size` is the command's own default (None: required)."""
    batch = {"default": batch_size, "required": batch_size is None, "show_default": batch_size is not None}
    return options_for(SamplingSpec, SPEC_OPTIONS, "spec", {
        ("labels",): {"type": str, "callback": parse_labels, "show_default": False},
        ("batch_size",): batch})


def resources_options(stage: str, actors: bool = True):
    """Add --actors / --num-cpus / --num-gpus for one stage; the command receives `resources`."""
    table = [(("actors",), "--actors", f"{stage} workers at once.")] if actors else []
    table += [(("num_cpus",), "--num-cpus", f"CPUs per {stage} worker, also its torch threads (default: a share "
                                            "that leaves the cluster a CPU for other work)."),
              (("num_gpus",), "--num-gpus", f"GPUs per {stage} worker (it samples on CUDA when given one).")]
    return options_for(Resources, table, "resources")


# --checkpoint and --in-channels; the command receives `model_ref`
checkpoint_options = options_for(ModelRef, [
    (("checkpoint",), "--checkpoint", "The model: 'demo' (shipped), a tarflow-gs .safetensors or raw apple .pth "
                                      "path, or a URI."),
    (("in_channels",), "--in-channels", "Image channels; only read for raw .pth checkpoints.")], "model_ref",
    {("checkpoint",): {"required": True, "default": None, "show_default": False}})


def progress_option(command):
    """--progress/--no-progress; unset (None): a bar only when stderr is a terminal (`workflows.progress`)."""
    return click.option(
        "--progress/--no-progress", default=None,
        help="--progress: progress bars; --no-progress: a plain line every 30 s instead. Default: bars only on a "
             "terminal, so `ray job logs` and CI logs get lines, not carriage returns.")(command)
