"""training/flags.py: typed flags for any config dataclass over the presets it is given, knowing none
of its own (training/recipe.py's TrainConfig flags are tests/test_recipe.py's)."""

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

from training import flags

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Toy:
    preset: str = flags.option("small", "which preset", choices=("small", "large"))
    width: int = flags.option(8, "the width", within=flags.AT_LEAST_1)
    name: str = flags.option("x", "a name", form=flags.Form("[a-z]+", "lower-case letters"))


    steps: tuple[int, ...] = flags.option((), "any number of steps", within=flags.AT_LEAST_0)


TOY_PRESETS = {"small": {}, "large": {"width": 64, "steps": (10, 20)}}


def refused(capsys, argv: list[str], validate=None) -> str:
    with pytest.raises(SystemExit) as exit_:
        flags.parse_flags(Toy, TOY_PRESETS, argv, validate=validate)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.endswith(" (see --help)\n")
    return error


def test_flags_override_the_named_preset_which_overrides_the_defaults():
    assert flags.parse_flags(Toy, TOY_PRESETS, []) == Toy()
    assert flags.parse_flags(Toy, TOY_PRESETS, ["--preset", "large"]).width == 64
    assert flags.parse_flags(Toy, TOY_PRESETS, ["--preset", "large", "--width", "3"]).width == 3


def test_a_tuple_of_any_length_takes_any_number_of_values_each_checked(capsys):
    assert flags.parse_flags(Toy, TOY_PRESETS, ["--steps", "1", "2", "3"]).steps == (1, 2, 3)
    assert flags.parse_flags(Toy, TOY_PRESETS, ["--preset", "large", "--steps"]).steps == ()
    assert "argument --steps: expected an integer >= 0; got '-1'" in refused(capsys, ["--steps", "4", "-1"])


def test_a_value_outside_its_range_or_form_is_one_line(capsys):
    assert "argument --width: expected an integer >= 1; got '0'" in refused(capsys, ["--width", "0"])
    assert "argument --name: expected lower-case letters; got 'X1'" in refused(capsys, ["--name", "X1"])


def test_a_preset_is_held_to_the_rules_of_a_flag(capsys):
    bad = {"small": {"width": 0}, "large": {}}
    with pytest.raises(SystemExit):
        flags.parse_flags(Toy, bad, [])
    assert "--preset small sets width = 0: expected an integer >= 1; got 0" in capsys.readouterr().err


def test_the_whole_config_check_is_refused_as_a_flag_is(capsys):
    def validate(toy: Toy) -> str | None:
        return f"--width {toy.width} is odd" if toy.width % 2 else None

    assert "error: --width 3 is odd" in refused(capsys, ["--width", "3"], validate)
    assert flags.parse_flags(Toy, TOY_PRESETS, ["--width", "4"], validate=validate).width == 4


def test_help_shows_each_presets_value():
    (width,) = [f for f in dataclasses.fields(Toy) if f.name == "width"]
    assert flags.help_text(width, TOY_PRESETS) == "the width (>= 1) [default 8; large 64]"


def test_the_machinery_imports_nothing_but_the_standard_library():
    # No config, preset or recipe of its own: those come in as arguments.
    tree = ast.parse((ROOT / "training" / "flags.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and {name.split(".")[0] for name in imported} <= sys.stdlib_module_names
