"""training/schedule.py: one Schedule per run, queried by step, applied to the optimizer in one call;
the same object in train_gpt.py, tools/parity.py, bench/ and the GPT experiments."""

import dataclasses

import pytest
import torch

from model import GPT, PRESETS
from training import recipe
from training.schedule import Schedule, StepSettings

SPEEDRUN = recipe.parse_config(["--preset", "speedrun"])


def test_lr_is_constant_then_cools_down_linearly_to_the_floor():
    schedule = Schedule.of(recipe.TrainConfig(max_steps=100, cooldown_frac=0.4, lr_floor=0.1))
    assert schedule.lr_factor(0) == schedule.lr_factor(60) == 1.0
    assert schedule.lr_factor(80) == pytest.approx(0.55)  # halfway down from 1 to 0.1
    assert schedule.lr_factor(100) == pytest.approx(0.1)


def test_lr_stays_constant_without_a_cooldown():
    schedule = Schedule.of(recipe.TrainConfig(max_steps=10, cooldown_frac=0.0))
    assert [schedule.lr_factor(step) for step in (0, 9, 10)] == [1.0, 1.0, 1.0]


def test_the_speedrun_schedule_at_hand_computed_steps():
    # T = 1750, cooldown over the last 45% to 0.05; momentum 0.85 -> 0.95 over 300 steps; window
    # 128 ceil(1728 s / 1750 / 128), at least 128.
    at = Schedule.of(SPEEDRUN).at
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
    schedule = Schedule.of(cfg)
    assert schedule.momentum_at(0) == 0.85 and schedule.momentum_at(150) == pytest.approx(0.90)
    assert schedule.momentum_at(999) == 0.95
    windows = [schedule.window_at(s) for s in range(0, 1001, 50)]
    assert windows[0] == 128 and windows[-1] == 1792 and windows == sorted(windows)
    assert all(w % 128 == 0 for w in windows)
    assert Schedule.of(recipe.TrainConfig()).window_at(5) is None  # demo: full causal attention


def test_the_distinct_windows_and_the_first_step_of_each():
    schedule = Schedule.of(SPEEDRUN)
    assert schedule.windows() == [128 * k for k in range(1, 15)]
    firsts = schedule.first_steps()
    assert [schedule.window_at(s) for s in firsts] == schedule.windows()
    assert all(schedule.window_at(s - 1) != schedule.window_at(s) for s in firsts[1:])
    assert firsts[:3] == [0, 130, 260]  # 1728 s/1750 passes 128 at s = 130, 256 at s = 260
    assert Schedule.of(recipe.TrainConfig()).first_steps() == [0]  # full causal: one shape


def test_apply_sets_every_groups_lr_and_muons_momentum_and_leaves_adams():
    model = GPT(PRESETS["demo"])
    cfg = recipe.TrainConfig(max_steps=100, cooldown_frac=0.4, lr_floor=0.1, momentum_start=0.85,
                             momentum_warmup_steps=300)
    optimizer = recipe.build_optimizer(model, cfg)
    betas = [g["momentum"] for g in optimizer.param_groups if g["kind"] == "adam"]
    now = Schedule.of(cfg).apply(optimizer, 80)
    assert now.lr_factor == pytest.approx(0.55) and now.momentum == pytest.approx(0.85 + 0.1 * 80 / 300)
    assert all(g["lr"] == g["initial_lr"] * now.lr_factor for g in optimizer.param_groups)
    assert {g["initial_lr"] for g in optimizer.param_groups if g["kind"] == "hidden"} == {cfg.lr}
    assert {g["momentum"] for g in optimizer.param_groups if g["kind"] != "adam"} == {now.momentum}
    assert [g["momentum"] for g in optimizer.param_groups if g["kind"] == "adam"] == betas  # Adam's beta1


def test_the_schedule_is_built_from_the_configs_fields_of_the_same_names():
    cfg = recipe.TrainConfig(max_steps=77, tokens_per_step=256, warmup_steps=3, cooldown_frac=0.3,
                             lr_floor=0.2, momentum=0.9, momentum_start=0.8, momentum_warmup_steps=11,
                             window_start=256, window_end=1024)
    schedule = Schedule.of(cfg)
    for f in dataclasses.fields(Schedule):
        if f.init and f.name != "device":
            assert getattr(schedule, f.name) == getattr(cfg, f.name), f.name


def test_window_tensors_only_on_a_device():
    assert Schedule.of(SPEEDRUN).window_tensors == {}
    on_cpu = Schedule.of(SPEEDRUN, torch.device("cpu"))
    assert [int(t) for t in on_cpu.window_tensors.values()] == on_cpu.windows()


def test_train_gpt_parity_bench_and_the_experiments_use_the_one_schedule():
    import bench.structure
    import experiments.gpt_train
    import tools.parity
    import train_gpt

    assert train_gpt.Schedule is tools.parity.Schedule is bench.structure.Schedule is Schedule
    assert isinstance(experiments.gpt_train.experiment_schedule(1750, 128), Schedule)


def test_the_experiments_schedule_is_the_speedruns_shape_with_a_floor_of_0_1():
    # experiments/gpt_train.py: the preset's cooldown and momentum warm-up, lr floor 0.1 (the preset's
    # 0.05), full causal attention; equal at every step to the Schedule of such a TrainConfig.
    from experiments.gpt_train import experiment_schedule

    ours = experiment_schedule(1750, 128)
    cfg = dataclasses.replace(SPEEDRUN, lr_floor=0.1, window_end=0, tokens_per_step=128)
    assert all(ours.at(s) == Schedule.of(cfg).at(s) for s in range(1751))
