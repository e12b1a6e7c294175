"""training/recipe.py: its flags over presets (training/flags.py), flags that explain and check
themselves, the batch layout over processes, the optimizer's groups."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from model import PRESETS, GPTConfig
from training import flags, recipe

FIELDS = {f.name: f for f in dataclasses.fields(recipe.TrainConfig)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_error(capsys, *argv: str) -> str:
    """The parser's stderr for argv, which must be refused with exit code 2."""
    with pytest.raises(SystemExit) as refused:
        recipe.parse_config(list(argv))
    assert refused.value.code == 2
    return capsys.readouterr().err


def test_flags_override_the_preset():
    cfg = recipe.parse_config(["--preset", "speedrun-2025-07-12", "--max-steps", "7", "--adam-betas", "0.9",
                               "0.99"])
    assert (cfg.model, cfg.max_steps, cfg.adam_betas, cfg.lr) == ("124m", 7, (0.9, 0.99), 0.05)
    assert cfg.tokens_per_step == 393_216 and cfg.val_tokens == 10_485_760


def test_every_parameter_lands_in_exactly_one_optimizer_group():
    from model import GPT, PRESETS

    model = GPT(PRESETS["demo"])
    optimizer = recipe.build_optimizer(model, recipe.TrainConfig())
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    kinds = {g["kind"] for g in optimizer.param_groups}
    assert kinds == {"hidden", "embed", "adam"}


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        recipe.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in FIELDS.values():
        assert f.metadata["help"], f"{f.name} has no help text"
        assert flag(f.name) in text and " ".join(f.metadata["help"].split()[:4]) in text


@pytest.mark.parametrize("name", [n for n, f in FIELDS.items() if f.metadata["choices"]])
def test_a_typo_in_a_choice_fails_at_parse_time_listing_the_choices(capsys, name):
    error = parse_error(capsys, flag(name), "typo")
    assert error.count("\n") == 1 and f"argument {flag(name)}: expected one of" in error
    assert all(choice in error for choice in FIELDS[name].metadata["choices"])


# A value just outside each range, and NaN, which no range holds.
OUTSIDE = {flags.AT_LEAST_1: "0", flags.AT_LEAST_0: "-1", flags.FRACTION: "1.5", flags.BELOW_1: "1",
           flags.POSITIVE: "0", flags.SEED: str(2**64)}


@pytest.mark.parametrize("name", [n for n, f in FIELDS.items() if f.metadata["within"]])
@pytest.mark.parametrize("bad", ["outside", "nan"])
def test_a_number_out_of_range_fails_at_parse_time(capsys, name, bad):
    within = FIELDS[name].metadata["within"]
    value = OUTSIDE[within] if bad == "outside" else "nan"
    values = [value] * (2 if name == "adam_betas" else 1)
    error = parse_error(capsys, flag(name), *values)
    assert error.count("\n") == 1 and f"argument {flag(name)}: expected" in error and str(within) in error


def test_every_range_is_listed_with_a_value_outside_it():
    assert {f.metadata["within"] for f in FIELDS.values()} - {None} == set(OUTSIDE)


def test_an_abbreviated_flag_is_refused(capsys):
    assert "unrecognized arguments: --max-step 1" in parse_error(capsys, "--max-step", "1")


def test_a_device_name_is_checked_at_parse_time(capsys):
    assert "expected auto, cpu, cuda, cuda:N or mps; got 'gpu'" in parse_error(capsys, "--device", "gpu")
    assert recipe.parse_config(["--device", "cuda:1"]).device == "cuda:1"


def test_a_window_that_shrinks_is_refused(capsys):
    error = parse_error(capsys, "--window-start", "512", "--window-end", "256")
    assert "--window-start 512 is past --window-end 256" in error


def test_fsdp_with_an_option_fully_shard_refuses_is_one_line_naming_each(capsys):
    error = parse_error(capsys, "--preset", "speedrun", "--fsdp")
    assert error.count("\n") == 1 and ("--fsdp with --adam-step-every 2, --normuon, --step-rounding "
                                        "stepwise, --wd-form in_update: fully_shard averages each gradient "
                                        "at every backward") in error
    assert ("pass --adam-step-every 1, --no-normuon, --step-rounding precise, --wd-form decoupled, or "
            "leave out --fsdp") in error
    assert recipe.parse_config(["--fsdp", "--adam-step-every", "1"]).fsdp


def test_any_tuple_field_becomes_a_flag_of_that_many_values():
    @dataclasses.dataclass
    class Spec:
        triple: tuple[int, int, int] = flags.option((1, 2, 3), "three numbers", within=flags.AT_LEAST_0)

    spec = flags.flag_spec(dataclasses.fields(Spec)[0])
    assert spec["nargs"] == 3 and spec["type"]("7") == 7


@pytest.mark.parametrize("preset", sorted(recipe.PRESETS_TRAIN))
def test_every_preset_passes_the_checks_a_flag_gets(preset):
    cfg = recipe.parse_config(["--preset", preset])
    for name, value in recipe.PRESETS_TRAIN[preset].items():
        assert getattr(cfg, name) == value and flags.check(FIELDS[name], value) is None


@pytest.mark.parametrize("processes, micro_batch", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_the_demo_step_splits_over_processes_without_flags(processes, micro_batch):
    layout = recipe.batch_layout(recipe.parse_config([]), processes)
    assert layout == recipe.BatchLayout(micro_batch=micro_batch, grad_accum=1, val_batch=8)


def test_a_step_that_cannot_split_names_the_flags_and_values_that_fit():
    with pytest.raises(SystemExit) as refused:
        recipe.batch_layout(recipe.parse_config([]), 3)
    message = str(refused.value.code)
    assert "--tokens-per-step 1024 is not a multiple of 3 processes x --seq-len 128 = 384" in message
    assert "--val-tokens 8192 is not a multiple of 3 processes x --val-seq-len 128 = 384" in message
    suggested = message.split("; try ")[1].split()
    assert suggested == ["--tokens-per-step", "1152", "--val-tokens", "8064"]
    layout = recipe.batch_layout(recipe.parse_config(suggested), 3)
    assert layout == recipe.BatchLayout(micro_batch=3, grad_accum=1, val_batch=7)


def test_batch_size_caps_the_micro_batch_and_accumulation_makes_up_the_step():
    cfg = recipe.parse_config(["--batch-size", "3"])  # 8 sequences a step: 4 micro-batches of 2
    assert recipe.batch_layout(cfg, 1) == recipe.BatchLayout(micro_batch=2, grad_accum=4, val_batch=2)
    speedrun = recipe.parse_config(["--preset", "speedrun-2025-07-12"])  # one 48k sequence per GPU per step
    assert [recipe.batch_layout(speedrun, gpus).grad_accum for gpus in (1, 2, 4, 8)] == [8, 4, 2, 1]


# ---------------------------------------------------------------------------------------------------
# docs/RECIPE.md: each speedrun preset beside the record it follows

RECIPE_MD = Path(__file__).resolve().parents[1] / "docs" / "RECIPE.md"
# Each preset's table in docs/RECIPE.md: its heading, its cells, and the TrainConfig fields the preset
# leaves at their defaults but the record also sets.
TABLES = {
    "speedrun": ("### Settings of `--preset speedrun` (record #46)", ("ours", "record", "since", "why"),
                 ("warmup_steps", "momentum", "momentum_start", "momentum_warmup_steps", "ns_steps")),
    "speedrun-2025-07-12": ("### Settings of `--preset speedrun-2025-07-12`", ("ours", "record", "why"),
                            ("adam_betas", "weight_decay", "warmup_steps", "momentum", "momentum_start",
                             "momentum_warmup_steps", "ns_coefficients", "ns_steps")),
}


def table_value(text: str):
    """A table cell as a value: a Python literal, arithmetic on number literals (`0.008 * 75`), or the
    text itself (`sigmoid`)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return text
    literal = (ast.Expression, ast.Constant, ast.Tuple, ast.BinOp, ast.UnaryOp, ast.Load, ast.Mult, ast.Div,
               ast.Add, ast.Sub, ast.USub)
    if not all(isinstance(node, literal) for node in ast.walk(tree)):
        return text
    return eval(compile(tree, "RECIPE.md", "eval"), {"__builtins__": {}})


def same(a, b) -> bool:
    """Equal, numbers to 1e-12 relative (0.008 * 75 is 0.6000000000000001 in floats)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == pytest.approx(b, rel=1e-12)
    return a == b


def recipe_rows(preset: str) -> dict[str, dict]:
    """The rows of the preset's settings table that name a field: field -> {ours, record, (since,) why}."""
    heading, columns, _ = TABLES[preset]
    section = RECIPE_MD.read_text().split(heading + "\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 2 + len(columns) and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = dict(zip(columns, cells[2:], strict=True))
    return rows


ROWS = [(preset, field) for preset in TABLES for field in sorted(recipe_rows(preset))]


def preset_value(preset: str, field: str):
    cfg = recipe.parse_config(["--preset", preset])
    if field.startswith("model."):
        return getattr(PRESETS[cfg.model], field.removeprefix("model."))
    return getattr(cfg, field)


@pytest.mark.parametrize("preset, field", ROWS)
def test_recipe_md_holds_the_presets_value(preset, field):
    row = recipe_rows(preset)[field]
    assert same(table_value(row["ours"]), preset_value(preset, field)), f"RECIPE.md {preset} {field}: {row}"


@pytest.mark.parametrize("preset, field", ROWS)
def test_recipe_md_says_why_wherever_the_preset_differs_from_the_record(preset, field):
    # A reason where the values differ, none where they agree; a setting the record lacks (—) may have one.
    row = recipe_rows(preset)[field]
    if row["record"] != "—":
        differs = not same(table_value(row["ours"]), table_value(row["record"]))
        assert bool(row["why"]) == differs, f"docs/RECIPE.md {preset} {field}: a reason iff the values differ"


@pytest.mark.parametrize("preset", sorted(TABLES))
def test_recipe_md_has_a_row_for_every_setting_of_the_preset_and_its_model(preset):
    fields = {*recipe.PRESETS_TRAIN[preset], *TABLES[preset][2]}
    fields |= {f"model.{f.name}" for f in dataclasses.fields(GPTConfig)}
    assert fields - set(recipe_rows(preset)) == set()


def test_recipe_md_names_the_record_that_brought_each_46_setting():
    # "since": #27-#46 (the records after 2025-07-12), ≤#26 (that record had it), or — with the record's —;
    # and a record value that moved since 2025-07-12 must name one of #27-#46.
    rows, old = recipe_rows("speedrun"), recipe_rows("speedrun-2025-07-12")
    for field, row in rows.items():
        since = row["since"]
        numbers = [int(n) for n in re.findall(r"#(\d+)", since)]
        assert since == "≤#26" or (numbers and all(27 <= n <= 46 for n in numbers)) or \
            since == row["record"] == "—", f"docs/RECIPE.md speedrun {field}: since {since!r}"
        if field in old and old[field]["record"] != "—" and since == "≤#26":
            assert same(table_value(row["record"]), table_value(old[field]["record"])), \
                f"docs/RECIPE.md speedrun {field}: the record's value moved since 2025-07-12; name the record"


def test_the_speedrun_optimizer_computes_as_the_record_and_the_demo_as_the_library():
    # docs/RECIPE.md rows adam_eps_form, ns_eps, ns_rounding; the library's defaults elsewhere.
    from model import GPT

    model = GPT(PRESETS["demo"])
    record = dict(eps_form="raw", ns_rounding="stepwise")
    for preset, want in (("speedrun-2025-07-12", dict(record, ns_eps=1e-7 / 49152)),
                         ("speedrun", dict(record, ns_eps=1e-6, ns_rounding="fused")),
                         ("demo", dict(eps_form="corrected", ns_eps=None, ns_rounding="precise"))):
        optimizer = recipe.build_optimizer(model, recipe.parse_config(["--preset", preset]))
        for group in optimizer.param_groups:
            assert {key: group[key] for key in want} == want, (preset, group["kind"])
