"""training/recipe.py: flags over presets, the schedules, the optimizer's groups."""

import pytest

from training import recipe


def test_flags_override_the_preset():
    cfg = recipe.parse_config(["--preset", "speedrun", "--max-steps", "7", "--adam-betas", "0.9", "0.99"])
    assert (cfg.model, cfg.max_steps, cfg.adam_betas, cfg.lr) == ("124m", 7, (0.9, 0.99), 0.05)
    assert cfg.tokens_per_step == 393_216 and cfg.val_tokens == 10_485_760


def test_lr_is_constant_then_cools_down_linearly_to_the_floor():
    cfg = recipe.TrainConfig(max_steps=100, cooldown_frac=0.4, lr_floor=0.1)
    assert recipe.lr_factor(0, cfg) == recipe.lr_factor(60, cfg) == 1.0
    assert recipe.lr_factor(80, cfg) == pytest.approx(0.55)  # halfway down from 1 to 0.1
    assert recipe.lr_factor(100, cfg) == pytest.approx(0.1)


def test_momentum_warms_up_and_window_grows_in_blocks_of_128():
    cfg = recipe.TrainConfig(max_steps=1000, momentum_start=0.85, momentum=0.95, momentum_warmup_steps=300,
                                window_start=128, window_end=1792)
    assert recipe.momentum_at(0, cfg) == 0.85 and recipe.momentum_at(150, cfg) == pytest.approx(0.90)
    assert recipe.momentum_at(999, cfg) == 0.95
    windows = [recipe.window_at(s, cfg) for s in range(0, 1001, 50)]
    assert windows[0] == 128 and windows[-1] == 1792 and windows == sorted(windows)
    assert all(w % 128 == 0 for w in windows)
    assert recipe.window_at(5, recipe.TrainConfig()) is None  # demo: full causal attention


def test_every_parameter_lands_in_exactly_one_optimizer_group():
    from model import GPT, PRESETS

    model = GPT(PRESETS["demo"])
    optimizer = recipe.build_optimizer(model, recipe.TrainConfig())
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    kinds = {g["kind"] for g in optimizer.param_groups}
    assert kinds == {"hidden", "embed", "adam"}
