"""training/schedule.py: one Schedule per run, queried by step, applied to the optimizer in one call;
the same object in train_gpt.py, tools/parity.py, bench/ and the GPT experiments."""

import dataclasses

import pytest
import torch

from model import GPT, PRESETS
from training import recipe
from training.schedule import Schedule, StepSettings

SPEEDRUN = recipe.parse_config(["--preset", "speedrun-2025-07-12"])  # the schedule without tables


def test_lr_is_constant_then_cools_down_linearly_to_the_floor():
    schedule = recipe.schedule_of(recipe.TrainConfig(max_steps=100, cooldown_frac=0.4, lr_floor=0.1))
    assert schedule.lr_factor(0) == schedule.lr_factor(60) == 1.0
    assert schedule.lr_factor(80) == pytest.approx(0.55)  # halfway down from 1 to 0.1
    assert schedule.lr_factor(100) == pytest.approx(0.1)


def test_lr_stays_constant_without_a_cooldown():
    schedule = recipe.schedule_of(recipe.TrainConfig(max_steps=10, cooldown_frac=0.0))
    assert [schedule.lr_factor(step) for step in (0, 9, 10)] == [1.0, 1.0, 1.0]


def test_the_speedrun_schedule_at_hand_computed_steps():
    # T = 1750, cooldown over the last 45% to 0.05; momentum 0.85 -> 0.95 over 300 steps; window
    # 128 ceil(1728 s / 1750 / 128), at least 128.
    at = recipe.schedule_of(SPEEDRUN).at
    assert at(0) == StepSettings(lr_factor=1.0, momentum=0.85, window=128, tokens=393_216)
    assert at(962).lr_factor == 1.0  # 962/1750 < 0.55
    w = (1 - 963 / 1750) / 0.45  # 0.99937: the first step of the cooldown
    assert at(963).lr_factor == pytest.approx(w + (1 - w) * 0.05, rel=1e-15)
    assert at(1400).lr_factor == pytest.approx(0.2 / 0.45 + (1 - 0.2 / 0.45) * 0.05, rel=1e-15)  # 0.4722
    assert at(1750).lr_factor == pytest.approx(0.05, rel=1e-15)
    assert at(150).momentum == pytest.approx(0.90, rel=1e-15)
    assert at(300).momentum == at(1750).momentum == 0.95
    assert [at(s).window for s in (0, 130, 875, 1749, 1750)] == [128, 256, 896, 1792, 1792]  # 875: 864 -> 896


def test_the_lr_warms_up_linearly_from_one_step():
    schedule = Schedule(max_steps=20, tokens_per_step=64, warmup_steps=4, cooldown_frac=0.5, lr_floor=0.0)
    assert [schedule.lr_factor(s) for s in (0, 1, 3, 4, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert schedule.lr_factor(15) == pytest.approx(0.5) and schedule.lr_factor(20) == 0.0


def test_momentum_warms_up_and_window_grows_in_blocks_of_128():
    cfg = recipe.TrainConfig(max_steps=1000, momentum_start=0.85, momentum=0.95, momentum_warmup_steps=300,
                             window_start=128, window_end=1792)
    schedule = recipe.schedule_of(cfg)
    assert schedule.momentum_at(0) == 0.85 and schedule.momentum_at(150) == pytest.approx(0.90)
    assert schedule.momentum_at(999) == 0.95
    windows = [schedule.window_at(s) for s in range(0, 1001, 50)]
    assert windows[0] == 128 and windows[-1] == 1792 and windows == sorted(windows)
    assert all(w % 128 == 0 for w in windows)
    assert recipe.schedule_of(recipe.TrainConfig()).window_at(5) is None  # demo: full causal attention


def test_the_distinct_windows_and_the_first_step_of_each():
    schedule = recipe.schedule_of(SPEEDRUN)
    assert schedule.windows() == [128 * k for k in range(1, 15)]
    firsts = schedule.first_steps()
    assert [schedule.window_at(s) for s in firsts] == schedule.windows()
    assert all(schedule.window_at(s - 1) != schedule.window_at(s) for s in firsts[1:])
    assert firsts[:3] == [0, 130, 260]  # 1728 s/1750 passes 128 at s = 130, 256 at s = 260
    assert recipe.schedule_of(recipe.TrainConfig()).first_steps() == [0]  # full causal: one shape


def test_apply_sets_every_groups_lr_and_muons_momentum_and_leaves_adams():
    model = GPT(PRESETS["demo"])
    cfg = recipe.TrainConfig(max_steps=100, cooldown_frac=0.4, lr_floor=0.1, momentum_start=0.85,
                             momentum_warmup_steps=300)
    optimizer = recipe.build_optimizer(model, cfg)
    betas = [g["momentum"] for g in optimizer.param_groups if g["kind"] == "adam"]
    now = recipe.schedule_of(cfg).apply(optimizer, 80)
    assert now.lr_factor == pytest.approx(0.55) and now.momentum == pytest.approx(0.85 + 0.1 * 80 / 300)
    assert all(g["lr"] == g["initial_lr"] * now.lr_factor for g in optimizer.param_groups)
    assert {g["initial_lr"] for g in optimizer.param_groups if g["kind"] == "hidden"} == {cfg.lr}
    assert {g["momentum"] for g in optimizer.param_groups if g["kind"] != "adam"} == {now.momentum}
    assert [g["momentum"] for g in optimizer.param_groups if g["kind"] == "adam"] == betas  # Adam's beta1


def test_the_schedule_is_built_from_the_configs_fields_of_the_same_names():
    cfg = recipe.TrainConfig(max_steps=77, tokens_per_step=256, warmup_steps=3, cooldown_frac=0.3,
                             lr_floor=0.2, momentum=0.9, momentum_start=0.8, momentum_warmup_steps=11,
                             window_start=256, window_end=1024)
    schedule = recipe.schedule_of(cfg)
    for f in dataclasses.fields(Schedule):
        if f.init and f.name != "device":
            assert getattr(schedule, f.name) == getattr(cfg, f.name), f.name


def test_window_tensors_only_on_a_device():
    assert recipe.schedule_of(SPEEDRUN).window_tensors == {}
    on_cpu = recipe.schedule_of(SPEEDRUN, torch.device("cpu"))
    assert [int(t) for t in on_cpu.window_tensors.values()] == on_cpu.windows()


def test_the_run_parity_bench_and_the_experiments_use_the_one_schedule():
    import bench.structure
    import experiments.gpt_train
    import tools.parity
    import training.run

    builders = {training.run.schedule_of, tools.parity.schedule_of, bench.structure.schedule_of}
    assert builders == {recipe.schedule_of}
    assert isinstance(recipe.schedule_of(SPEEDRUN), Schedule)
    assert isinstance(experiments.gpt_train.experiment_schedule(1750, 128), Schedule)


def test_the_experiments_schedule_is_the_speedruns_shape_with_a_floor_of_0_1():
    # experiments/gpt_train.py: the preset's cooldown and momentum warm-up, lr floor 0.1 (the preset's
    # 0.05), full causal attention; equal at every step to the Schedule of such a TrainConfig.
    from experiments.gpt_train import experiment_schedule

    ours = experiment_schedule(1750, 128)
    cfg = dataclasses.replace(SPEEDRUN, lr_floor=0.1, window_end=0, tokens_per_step=128)
    assert all(ours.at(s) == recipe.schedule_of(cfg).at(s) for s in range(1751))


# ---- record #46's schedule (training/schedule.py's docstring) as flags: 2160 steps, scheduled over 2120 ----

RECORD_46 = ["--max-steps", "2160", "--scheduled-steps", "2120", "--cooldown-frac", "0.55",
             "--lr-floor", "0.1", "--lr-levels", "1", "1.51", "1.93", "--lr-level-fracs", "0.33", "0.66",
             "--momentum-cooldown-steps", "50", "--window-blocks", "3", "7", "11", "13",
             "--tokens-per-step", "393216", "--tokens-schedule", "131072", "262144", "393216", "393216"]


@pytest.fixture(scope="module")
def record_46() -> Schedule:
    return recipe.schedule_of(recipe.parse_config(RECORD_46))


def cooled(level: float, step: int) -> float:
    """The cooldown from `level` at `step`: w level + (1 - w) 0.1, w = (1 - step/2120)/0.55."""
    w = (1 - step / 2120) / 0.55
    return level * w + (1 - w) * 0.1


def test_record_46_lr_steps_up_at_700_and_1400_and_cools_down_from_954_to_0_1(record_46):
    lr = {s: record_46.lr_factor(s) for s in (0, 699, 700, 953, 954, 1399, 1400, 2119, 2120, 2121, 2159)}
    assert (lr[0], lr[699], lr[700], lr[953]) == (1.0, 1.0, 1.51, 1.51)  # x = 700/2120 > 0.33 > 699/2120
    assert lr[954] == pytest.approx(1.51, rel=1e-15)  # x = 0.45 = 1 - 0.55: w = 1
    assert lr[1399] == pytest.approx(cooled(1.51, 1399), rel=1e-15)  # 1.0049
    assert lr[1400] == pytest.approx(cooled(1.93, 1400), rel=1e-15)  # 1.2300: the level steps up mid-cooldown
    assert lr[2119] == pytest.approx(cooled(1.93, 2119), rel=1e-15)  # 0.1016
    assert lr[2120] == lr[2121] == lr[2159] == pytest.approx(0.1, rel=1e-15)  # the extension: the floor


def test_record_46_momentum_warms_up_then_cools_down_after_step_2110(record_46):
    assert record_46.momentum_at(299) == pytest.approx(0.85 + 0.1 * 299 / 300, rel=1e-15)
    assert record_46.momentum_at(300) == record_46.momentum_at(2110) == 0.95
    assert record_46.momentum_at(2111) == pytest.approx(0.948, rel=1e-15)  # 0.95 - 0.1 (1/50)
    assert record_46.momentum_at(2135) == pytest.approx(0.90, rel=1e-15)
    assert record_46.momentum_at(2159) == pytest.approx(0.852, rel=1e-15)  # the last step trained
    assert record_46.momentum_at(2160) == pytest.approx(0.85, rel=1e-15)


def test_record_46_windows_and_tokens_switch_together_at_707_1414_2120(record_46):
    # int(3 s/2120) reaches 1 at s = 707 (706.67) and 2 at s = 1414 (1413.33); the final entry from 2120.
    steps = (0, 706, 707, 1413, 1414, 2119, 2120, 2160)
    assert [record_46.window_at(s) // 128 for s in steps] == [3, 3, 7, 7, 11, 11, 13, 13]
    assert [record_46.at(s).tokens for s in steps] == [131072, 131072, 262144, 262144, 393216, 393216,
                                                        393216, 393216]
    assert record_46.first_steps() == [0, 707, 1414, 2120]  # 4 shapes: what a warm-up must cover
    assert record_46.windows() == [384, 896, 1408, 1664]


def test_record_46_schedule_at_every_step_equals_its_formula(record_46):
    # The record's rules in our own words: lr level 1.93 from step 1400, 1.51 from 700,
    # cooldown from x = 0.45 and the floor 0.1 past step 2120; momentum 0.95 - 0.1 (s - 2110)/50 after
    # 2110; the table entry int(3 s/2120) before step 2120, the last one after.
    def lr(s: int) -> float:
        level = 1.93 if s >= 1400 else 1.51 if s >= 700 else 1.0
        return 0.1 if s > 2120 else cooled(level, s) if s / 2120 >= 0.45 else level

    def entry(table: tuple, s: int):
        return table[3] if s >= 2120 else table[int(3 * (s / 2120))]

    for s in range(2161):
        assert record_46.lr_factor(s) == lr(s), s
        if s > 2110:
            assert record_46.momentum_at(s) == 0.95 - (s - 2110) / 50 * (0.95 - 0.85), s
        assert record_46.window_at(s) == 128 * entry((3, 7, 11, 13), s), s
        assert record_46.at(s).tokens == entry((131072, 262144, 393216, 393216), s), s


@pytest.mark.parametrize("preset, blend", [("speedrun", "offset"), ("speedrun-2025-07-12", "weighted")])
def test_each_preset_warms_momentum_up_in_its_records_float_operations_to_the_bit(preset, blend):
    # Record #46: 0.85 + f (0.95 - 0.85); the 2025-07-12 record: (1 - f) 0.85 + f 0.95. The same numbers
    # but for the last bit at some steps, which bf16 Newton-Schulz turns into another update.
    schedule = recipe.schedule_of(recipe.parse_config(["--preset", preset]))
    assert schedule.momentum_blend == blend
    forms = {"offset": lambda f: 0.85 + f * (0.95 - 0.85), "weighted": lambda f: (1 - f) * 0.85 + f * 0.95}
    warm_up = [schedule.momentum_at(s) for s in range(301)]
    assert warm_up == [forms[blend](s / 300) for s in range(300)] + [0.95]
    other = forms["weighted" if blend == "offset" else "offset"]
    assert sum(schedule.momentum_at(s) != other(s / 300) for s in range(300)) > 50


@pytest.mark.parametrize("flags, error", [
    (["--lr-levels", "1", "2"], "--lr-levels has 2 values for the 0 of --lr-level-fracs; expected one more"),
    (["--lr-levels", "1", "2", "3", "--lr-level-fracs", "0.6", "0.3"], "expected ascending fractions"),
    (["--scheduled-steps", "200"], "--scheduled-steps 200 is past --max-steps 150"),
    (["--preset", "speedrun-2025-07-12", "--window-blocks", "3", "7"],
     "--window-blocks 3 7 replaces --window-end 1728"),
])
def test_schedule_flags_that_do_not_fit_together_are_one_line(capsys, flags, error):
    with pytest.raises(SystemExit):
        recipe.parse_config(flags)
    message = capsys.readouterr().err
    assert error in message and message.count("\n") == 1


def test_record_46_schedule_compiles_one_training_graph_per_batch_shape_and_none_per_window(record_46):
    # Every shape of the whole schedule (its first steps: 4 pairs of window and tokens per step) through
    # the compiled 124M architecture at width 32: a training step per batch shape, 1, 2 and 3 sequences
    # for 131072, 262144 and 393216 tokens (scaled down 131072 : 64), and a validation, each at that
    # step's window tensor. One graph per batch shape and mode; the 4 windows add none.
    from training.compiling import compile_model

    model = GPT(dataclasses.replace(PRESETS["124m"], dim=32, n_head=2, head_dim=16, max_seq_len=64,
                                    attention="sdpa"))  # Flex compiles no backward on a CPU
    schedule = recipe.schedule_of(recipe.parse_config(RECORD_46), torch.device("cpu"))
    torch._dynamo.reset()  # no graphs or recompile budget left over from other tests
    forward, graphs = compile_model(model, "eager")
    tokens = torch.randint(0, 50257, (3, 65), generator=torch.Generator().manual_seed(0))
    for step in record_46.first_steps():
        rows, window = schedule.at(step).tokens // 131072, schedule.window_tensor(step)
        forward(tokens[:rows, :-1], tokens[:rows, 1:], window=window).backward()
        model.eval()
        with torch.no_grad():
            forward(tokens[:1, :-1], tokens[:1, 1:], window=window)
        model.train()
    assert (graphs.training, graphs.validation) == (3, 1)
