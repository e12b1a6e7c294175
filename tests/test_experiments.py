"""experiments/: each --quick run writes its JSON and figure and shows the paper's claim in small; helpers."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

from experiments import depth, gpt_optimizers, lr_transfer, stable_rank
from experiments.datasets import CIFAR_TEST, CIFAR_TRAIN, cifar10, teacher_task
from experiments.mlp import build, dual_sgd

MAX_PNG_BYTES = 200_000  # figures are committed; keep them small


def run_quick(module, tmp_path, *flags: str) -> dict:
    results = module.main(["--quick", "--out", str(tmp_path), *flags])
    saved = json.loads((tmp_path / f"{module.NAME}.json").read_text())
    assert saved["experiment"] == module.NAME and saved["mode"] == "quick"
    assert saved["command"].startswith(f"python -m experiments.{module.NAME} --quick")
    png = tmp_path / f"{module.NAME}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < MAX_PNG_BYTES
    return results


def all_finite_or_diverged(losses: list) -> bool:
    """A sweep's losses: finite numbers, or None where that lr diverged."""
    return all(loss is None or math.isfinite(loss) for loss in losses)


# ---- the four experiments, quick mode ------------------------------------------------------------


def test_lr_transfer_quick_dual_best_lr_moves_less_across_width_than_adams(tmp_path):
    results = run_quick(lr_transfer, tmp_path)
    assert results["task"].startswith("teacher (synthetic")  # no CIFAR given: the offline task, named
    for setup in ("dual", "standard"):
        sweeps = results["setups"][setup]["sweeps"]
        assert [s["width"] for s in sweeps] == lr_transfer.SETTINGS["quick"]["widths"]
        for s in sweeps:
            assert all_finite_or_diverged(s["train_loss"]) and math.isfinite(s["best_train_loss"])
            # every best run learned: below the uniform guess's ln(10) = 2.30
            assert s["best_train_loss"] < 0.6 * math.log(10)
    # measured (seed 0): dual 1.0 at widths 32 and 256, Adam 2^-5 -> 2^-6; a whole grid step apart
    setups = results["setups"]
    assert setups["dual"]["best_lr_log2_spread"] < setups["standard"]["best_lr_log2_spread"]


def test_stable_rank_quick_orders_gradient_below_newton_schulz_below_polar(tmp_path):
    results = run_quick(stable_rank, tmp_path)
    batch = results["settings"]["batch_size"]
    for row in results["widths"]:
        sr, w = row["stable_rank"], row["width"]
        assert 1 <= sr["gradient"] < sr["newton_schulz"] < sr["polar"]
        # exact polar: every kept singular value is 1, so sr = rank(G) <= min(w, batch)
        assert sr["polar"] <= min(w, batch) + 1e-6
        # without the threshold round-off directions count fully: sr = w exactly (tolerance: float64 SVD)
        assert sr["polar_no_threshold"] == pytest.approx(w, rel=1e-6)
        # same spectral step, higher stable rank: the dual step moves W further in Frobenius norm
        moved = {rule: row[rule]["relative_frobenius_change"] for rule in ("dual", "normalized_gradient")}
        assert moved["dual"] > moved["normalized_gradient"]


def test_depth_quick_modular_shares_keep_the_best_lr_across_depth(tmp_path):
    results = run_quick(depth, tmp_path)
    variants = results["variants"]
    for variant in variants.values():
        assert all(all_finite_or_diverged(s["train_loss"]) for s in variant["sweeps"])
    # measured (seed 0): plain 0.5 -> 0.25 from depth 3 to 12, modular 2.0 at both
    assert variants["modular"]["best_lr_log2_spread"] < variants["plain"]["best_lr_log2_spread"]


def test_gpt_optimizers_quick_runs_every_contender_and_reports_steps_to_adamws_loss(tmp_path):
    results = run_quick(gpt_optimizers, tmp_path)
    steps = gpt_optimizers.SETTINGS["quick"]["steps"]
    assert set(results["contenders"]) == set(gpt_optimizers.CONTENDERS)
    for name, contender in results["contenders"].items():
        best = contender["best"]
        first, last = best["val_curve"][0][1], best["final_val_loss"]
        assert math.isfinite(last), name
        # zero-initialized head: the first validation is ln(vocab); every best run went well below it
        assert first == pytest.approx(math.log(results["vocab_size"]), abs=1e-3)
        assert last < first - 1.0, name
    assert results["contenders"]["adamw"]["steps_to_adamw_final"] == pytest.approx(steps)


# ---- helpers -------------------------------------------------------------------------------------


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(0, 10.0), (10, 6.0), (20, 4.0), (30, 3.0)]
    assert gpt_optimizers.steps_to_reach(curve, 5.0) == pytest.approx(15.0)
    assert gpt_optimizers.steps_to_reach(curve, 3.0) == pytest.approx(30.0)
    assert gpt_optimizers.steps_to_reach(curve, 2.0) is None
    assert gpt_optimizers.steps_to_reach([(0, 10.0), (10, None), (20, 4.0)], 5.0) is None  # diverged at 10


def test_sweep_grows_the_grid_past_an_edge_holding_the_best():
    tried = []

    def run_at(lr):
        tried.append(math.log2(lr))
        return {"lr": lr, "final_val_loss": abs(math.log2(lr) + 6)}  # best at 2^-6

    runs = gpt_optimizers.sweep(run_at, [-3, -2], max_extend=2)
    assert tried == [-3, -2, -4, -5]  # grows downwards twice, then stops (max_extend)
    assert [math.log2(r["lr"]) for r in runs] == [-5, -4, -3, -2]


def test_dual_sgd_with_modular_shares_gives_each_layer_lr_over_depth():
    model = build(teacher_task(n_train=8, n_test=8), width=8, depth=4, setup="dual", seed=0)
    assert [g["lr"] for g in dual_sgd(model, 0.4, modular=True).param_groups] == pytest.approx([0.1] * 4)
    assert [g["lr"] for g in dual_sgd(model, 0.4).param_groups] == [0.4] * 4


def test_dual_init_gives_every_layer_rms_to_rms_norm_one():
    model = build(teacher_task(n_train=8, n_test=8), width=16, depth=3, setup="dual", seed=0)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            d_out, d_in = layer.weight.shape
            sigma = torch.linalg.svdvals(layer.weight) * math.sqrt(d_in / d_out)
            assert torch.allclose(sigma, torch.ones_like(sigma), atol=1e-5)  # float32 QR round-off


def test_cifar10_reads_the_pickle_batches_and_standardizes_each_channel(tmp_path):
    rng = np.random.default_rng(0)
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    task = cifar10(tmp_path, n_train=60)
    assert task.x_train.shape == (60, 3072) and task.x_test.shape == (20, 3072) and task.n_classes == 10
    channels = task.x_train.view(60, 3, 1024)
    assert channels.mean((0, 2)).abs().max() < 1e-5  # standardized on these very images
    assert (channels.std((0, 2)) - 1).abs().max() < 1e-5


def test_missing_cifar_batch_stops_with_one_line_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="no data_batch_1 there") as stop:
        cifar10(tmp_path)
    assert "\n" not in str(stop.value)


@pytest.mark.parametrize(
    "module, flags",
    [(lr_transfer, ["--widths", "32,x"]), (depth, ["--depths", "1,4"]), (gpt_optimizers, ["--steps", "0"])],
)
def test_bad_flags_stop_with_a_usage_error(module, flags, capsys):
    with pytest.raises(SystemExit) as stop:
        module.main(["--quick", *flags])
    assert stop.value.code == 2 and flags[0] in capsys.readouterr().err


def test_out_that_is_a_file_stops_with_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        depth.main(["--quick", "--out", str(tmp_path / "file")])
