"""Typed flags from a config dataclass: one flag per field (`adam_betas` -> `--adam-betas`), whose help,
choices and range live with the field (`option`), over named presets of field values.

A flag given overrides the preset the `preset` field names, which overrides the field defaults; a bad
value, the flag's or the preset's, is refused at parse time with one line
(`prog: error: argument --x: expected ...; got ... (see --help)`, exit status 2). This module knows no
config of its own: training/recipe.py passes TrainConfig and its presets.
"""

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass

PRESET_FIELD = "preset"  # the field that names the preset the other flags override


@dataclass(frozen=True)
class Interval:
    """The numbers from low to high, each end included ("[", "]") or not ("(", ")"); never NaN or inf."""

    low: float
    high: float = math.inf
    ends: str = "[]"

    def __contains__(self, x: float) -> bool:
        above = self.low < x if self.ends[0] == "(" else self.low <= x
        below = x < self.high if self.ends[1] == ")" else x <= self.high
        return math.isfinite(x) and above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.ends[0] == '(' else '>='} {self.low:g}"
        high = self.high if isinstance(self.high, int) else f"{self.high:g}"  # an int bound in full
        return f"in {self.ends[0]}{self.low:g}, {high}{self.ends[1]}"


@dataclass(frozen=True)
class Form:
    """The texts a regular expression matches in full, described in words for the error line."""

    pattern: str
    words: str

    def __contains__(self, text: str) -> bool:
        return re.fullmatch(self.pattern, text, re.DOTALL) is not None

    def __str__(self) -> str:
        return self.words


AT_LEAST_1, AT_LEAST_0 = Interval(1), Interval(0)
SEED = Interval(0, 2**64 - 1)  # torch's generators take an unsigned 64-bit seed
POSITIVE, FRACTION, BELOW_1 = Interval(0, ends="(]"), Interval(0, 1), Interval(0, 1, "[)")
PATH = Form(r".*\S.*", "a path")  # not "" (an unset shell variable would mean the default folder)


def option(default, help: str, *, choices=None, within: Interval | None = None, form: Form | None = None):
    """A config field: its default, help text, and the choices, range or form a flag takes."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, within=within,
                                                            form=form))


def parse_flags(config_class: type, presets: dict[str, dict], argv: list[str] | None = None,
                description: str | None = None, validate: Callable[[typing.Any], str | None] | None = None):
    """config_class from argv: flags override presets[--preset], which overrides the field defaults;
    every value is checked, then the whole config by `validate` (its problem in one line, or None)."""
    parser = build_parser(config_class, presets, description)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    preset = args.pop(PRESET_FIELD, fields[PRESET_FIELD].default)
    for name, value in presets[preset].items():  # ours, but held to the same rules as a flag
        if name not in args and (problem := check(fields[name], value)):
            parser.error(f"--{PRESET_FIELD} {preset} sets {name} = {value!r}: {problem}")
    config = config_class(**{PRESET_FIELD: preset, **presets[preset], **args})
    if validate is not None and (problem := validate(config)):
        parser.error(problem)
    return config


class FlagParser(argparse.ArgumentParser):
    """argparse with one-line errors (`train_gpt.py: error: argument --x: ...`, exit 2), no abbreviations."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(config_class: type, presets: dict[str, dict], description: str | None = None) -> FlagParser:
    """One flag per field of config_class, every default None: a flag given overrides the preset."""
    parser = FlagParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_class):
        parser.add_argument("--" + f.name.replace("_", "-"), **flag_spec(f, presets))
    return parser


def flag_spec(f: dataclasses.Field, presets: dict[str, dict] | None = None) -> dict:
    """add_argument's keywords for a field, from its type and metadata (and its value in each preset)."""
    kind = f.type
    if isinstance(kind, types.UnionType):  # X | None -> X
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    spec = dict(default=None, help=help_text(f, presets or {}))
    if kind is bool:
        return {**spec, "action": argparse.BooleanOptionalAction}
    if f.metadata["choices"]:
        spec["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
    if typing.get_origin(kind) is tuple:  # tuple[X, X] takes two values, tuple[X, ...] any number
        items = typing.get_args(kind)
        nargs = "*" if items[1:] == (Ellipsis,) else len(items)
        return {**spec, "nargs": nargs, "type": parser_of(f, items[0]), "action": StoreTuple}
    return {**spec, "type": parser_of(f, kind)}


class StoreTuple(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(values))


def parser_of(f: dataclasses.Field, kind: type):
    """Text -> value for one flag value, raising ArgumentTypeError (one line) where `check` objects."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        problem = check(f, value, text)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def check(f: dataclasses.Field, value, text: str | None = None) -> str | None:
    """What is wrong with `value` for field f (its choices, range or form), or None."""
    got = f"got {text if text is not None else value!r}"
    choices, within, form = f.metadata["choices"], f.metadata["within"], f.metadata["form"]
    values = value if isinstance(value, tuple) else (value,)
    if choices is not None and value not in choices:
        return f"expected one of {', '.join(choices)}; {got}"
    if within is not None and any(v is None or v not in within for v in values):
        what = "an integer" if item_type(f.type) is int else "a number"
        return f"expected {what} {within}; {got}"
    if form is not None and value is not None and str(value) not in form:
        return f"expected {form}; {got}"
    return None


def item_type(kind) -> type:
    """The type of one value of a field of type `kind`: X for X, X | None and tuple[X, ...]."""
    if isinstance(kind, types.UnionType):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    return typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind


def help_text(f: dataclasses.Field, presets: dict[str, dict]) -> str:
    """The field's help, with its range and its value in each preset (choices are its metavar)."""
    parts = [f.metadata["help"]]
    if f.metadata["within"] is not None:
        parts.append(f"({f.metadata['within']})")
    values = [f"default {f.default}"] if f.default not in (None, "") else []
    values += [f"{name} {p[f.name]}" for name, p in presets.items() if f.name in p]
    if values and f.name != PRESET_FIELD:
        parts.append(f"[{'; '.join(values)}]")
    return " ".join(parts).replace("%", "%%")
