"""README.md says what the code does: its flag table matches train_gpt.py's parser."""

import dataclasses
import re
from pathlib import Path

from training import recipe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def flag_cells() -> list[str]:
    """The first cell of every row of the flag table."""
    rows = [line for line in section("Training flags").splitlines() if line.startswith("| `")]
    return [row.split(" | ")[0] for row in rows]


def listed_alternatives() -> dict[str, list[str]]:
    """{flag: values} for every `--flag a\\|b\\|c` the table writes out."""
    found = re.findall(r"(--[a-z][a-z0-9-]*) ([^\s`,]+(?:\\\|[^\s`,]+)+)", " ".join(flag_cells()))
    return {name: values.split("\\|") for name, values in found}


def test_the_flag_table_lists_every_flag_and_no_other():
    parser = recipe.build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(flag_cells())))
    assert listed == flags - {"-h", "--help"}


def test_each_choice_flag_lists_exactly_its_choices():
    alternatives = listed_alternatives()
    for f in dataclasses.fields(recipe.TrainConfig):
        if f.metadata["choices"]:
            name = "--" + f.name.replace("_", "-")
            assert sorted(alternatives.get(name, [])) == sorted(f.metadata["choices"]), name


def test_every_value_the_table_lists_is_accepted():
    alternatives = listed_alternatives()
    assert len(alternatives) == 8  # preset model embed-map lr-scale ns-coefficients device compile resume
    for name, values in alternatives.items():
        for value in values:
            if value.isupper():  # a placeholder such as PATH
                continue
            recipe.parse_config([name, value.replace("cuda:N", "cuda:0")])
