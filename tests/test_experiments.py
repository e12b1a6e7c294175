"""experiments/: each --quick run writes its JSON and figure and shows the paper's claim in small; helpers."""

import json
import math
import pickle
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from data.shards import write_shard
from data.tokenizer import EOT
from experiments import depth, gpt_depth, gpt_optimizers, lr_transfer, stable_rank
from experiments.datasets import CIFAR_TEST, CIFAR_TRAIN, cifar10, teacher_task
from experiments.gpt_train import (
    Runner,
    compact_corpus,
    experiment_schedule,
    lane_batches,
    spread_batches,
    stdlib_corpus,
    steps_to_reach,
    sweep_log2,
    train,
)
from experiments.mlp import build, dual_sgd
from experiments.modular import modular_norm, step_shares
from experiments.report import torch_threads
from model import GPT, GPTConfig

MAX_PNG_BYTES = 200_000  # figures are committed; keep them small


def run_quick(module, tmp_path, *flags: str) -> dict:
    results = module.main(["--quick", "--out", str(tmp_path), *flags])
    saved = json.loads((tmp_path / f"{module.NAME}.json").read_text())
    assert saved["experiment"] == module.NAME and saved["mode"] == "quick"
    assert saved["command"].startswith(f"python -m experiments.{module.NAME} --quick")
    assert saved["threads"] == 1  # the runs' --threads (default 1), not torch's count once restored
    png = tmp_path / f"{module.NAME}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < MAX_PNG_BYTES
    return results


def tiny_config(n_layer: int = 2, value_embeds: int = 0) -> GPTConfig:
    return GPTConfig(vocab_size=64, n_layer=n_layer, dim=32, n_head=1, head_dim=32, max_seq_len=16,
                     value_embeds=value_embeds)


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


def test_gpt_optimizers_quick_sweeps_every_contender_and_scores_each_seed_against_adamws(tmp_path):
    results = run_quick(gpt_optimizers, tmp_path)
    settings = gpt_optimizers.SETTINGS["quick"]
    assert set(results["contenders"]) == set(gpt_optimizers.CONTENDERS)
    for name, contender in results["contenders"].items():
        assert list(contender["sweeps"]) == list(gpt_optimizers.CONTENDERS[name].swept)
        assert [run["seed"] for run in contender["seeds"]] == settings["seeds"]
        for run in contender["seeds"]:
            assert run["log2_lrs"] == contender["best_log2_lrs"]
            # zero-initialized head: the first validation is ln(vocab); every best run went below it
            first = run["val_curve"][0][1]
            assert first == pytest.approx(math.log(settings["vocab_size"]), abs=1e-3), name
            assert run["final_val_loss"] < first - 0.5, name
    summary = results["summary"]
    # AdamW's own val curve reaches its own final loss, at the last evaluation at the latest
    assert summary["adamw"]["seeds_reaching_adamw_final"] == len(settings["seeds"])
    assert tuple(summary["muon"]["minus_speedrun_split"]) == (0.0, 0.0)  # the split against itself
    cached = (tmp_path / "gpt_optimizers.runs.jsonl").read_text().splitlines()
    specs = [json.loads(line)["spec"] for line in cached]
    assert len(specs) == len({json.dumps(spec, sort_keys=True) for spec in specs})  # each run ran once


def test_gpt_optimizers_run_repeats_a_recorded_run_from_its_command():
    lrs = {"hidden": -5, "embed": -3, "head": -4}
    spec = dict(mode="quick", contender="muon_embed_dual", log2_lrs=lrs, seed=1)
    with torch_threads(1):
        recorded = gpt_optimizers.run_spec(spec)
    command = recorded["command"].split()
    assert command[:3] == ["python", "-m", "experiments.gpt_optimizers"]
    again = gpt_optimizers.main(command[3:])
    assert again["val_curve"] == recorded["val_curve"]  # same seed, same batches: the same run, bitwise


def test_gpt_optimizers_give_each_group_its_own_map_and_lr():
    model = GPT(tiny_config(value_embeds=1))
    lrs = {"hidden": 0.1, "embed": 0.2, "head": 0.3}
    (muon,) = gpt_optimizers.make_optimizers("muon_embed_dual_head_linear", model, lrs).optimizers
    groups = {g["kind"]: g for g in muon.param_groups}
    assert {kind: g["lr"] for kind, g in groups.items()} == {
        "hidden": 0.1, "embed": 0.2, "head_linear": 0.3, "adam": gpt_optimizers.SCALAR_LR}
    assert groups["head_linear"]["params"] == [model.lm_head.weight]
    assert len(groups["embed"]["params"]) == 2  # the token and the value embedding
    counted = sum(p.numel() for g in muon.param_groups for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters())
    split = gpt_optimizers.make_optimizers("torch_muon", model, lrs)
    torch_muon, stacks, _ = split.optimizers  # torch's Muon takes 2-D only: ours steps the q, k, v stacks
    assert isinstance(torch_muon, torch.optim.Muon)
    assert [p.ndim for g in stacks.param_groups for p in g["params"]] == [3] * model.config.n_layer
    for optimizer in split.optimizers:  # the schedule's momentum warm-up reaches the Muon parts only
        experiment_schedule(100, 128).apply(optimizer, 0)
    assert [g["momentum"] for g in torch_muon.param_groups + stacks.param_groups] == [0.85, 0.85]
    assert all("momentum" not in g for g in split.optimizers[2].param_groups)  # AdamW: betas untouched
    held = [p for opt in split.optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, held)) == sorted(map(id, model.parameters()))


def test_gpt_depth_quick_sweeps_both_variants_at_every_depth(tmp_path):
    results = run_quick(gpt_depth, tmp_path)
    settings = gpt_depth.SETTINGS["quick"]
    for variant in results["variants"].values():
        assert [s["depth"] for s in variant["sweeps"]] == settings["depths"]
        for s in variant["sweeps"]:
            assert all_finite_or_diverged(s["val_loss"])
            assert s["best_val_loss"] < math.log(settings["vocab_size"]) - 0.5


# ---- the modular-norm GPT ------------------------------------------------------------------------


@pytest.mark.parametrize("n_layer", [2, 3, 8])
def test_gpt_tree_gives_embed_and_head_a_seventh_and_sublayer_j_shares_growing_as_j_plus_2(n_layer):
    shares = step_shares(gpt_depth.gpt_tree(n_layer))
    assert shares["embed.weight"] == pytest.approx(1 / 7, rel=1e-12)
    assert shares["lm_head.weight"] == pytest.approx(1 / 7, rel=1e-12)
    for i in range(n_layer):
        # qkv's share is each of its three matrices' (q, k, v: 3 each)
        attention, mlp = {"attn.qkv": 3, "attn.o": 1}, {"mlp.fc": 1, "mlp.proj": 1}
        weights = {2 * i: attention, 2 * i + 1: mlp}
        for j, names in weights.items():
            for name, factor in names.items():
                expected = factor * 5 / 7 * (j + 2) / (6 * n_layer)
                assert shares[f"blocks.{i}.{name}.weight"] == pytest.approx(expected, rel=1e-12)
    # every atom dualized and scaled by its share: the whole step has modular norm exactly 1
    assert modular_norm(gpt_depth.gpt_tree(n_layer), shares) == pytest.approx(1.0, rel=1e-12)


def test_residual_gpt_trains_exactly_the_weights_of_its_tree_with_the_skips_off():
    model = gpt_depth.residual_gpt(tiny_config(n_layer=4))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == set(step_shares(gpt_depth.gpt_tree(4)))
    assert torch.equal(model.skip_weights, torch.zeros(2))
    assert all(torch.equal(b.lambdas, torch.tensor([1.0, 0.0])) for b in model.blocks)
    with pytest.raises(ValueError, match="value_embeds must be 0"):
        gpt_depth.residual_gpt(tiny_config(value_embeds=1))


def test_depth_optimizer_steps_each_weight_at_eta_or_eta_times_its_share():
    model = gpt_depth.residual_gpt(tiny_config())
    shares = step_shares(gpt_depth.gpt_tree(2))
    names = {id(p): name for name, p in model.named_parameters()}
    for modular in (False, True):
        (muon,) = gpt_depth.depth_optimizer(model, 0.5, modular).optimizers
        for g in muon.param_groups:
            name = names[id(g["params"][0])]
            assert g["lr"] == pytest.approx(0.5 * (shares[name] if modular else 1.0), rel=1e-12)
            assert g["kind"] == gpt_depth.KINDS.get(name, "hidden") and g["lr_scale"] == "spectral"


# ---- the GPT harness -----------------------------------------------------------------------------


def test_compact_corpus_keeps_the_most_frequent_ids_and_eot_and_maps_the_rest_to_one(tmp_path):
    write_shard(tmp_path / "t_train_000001.bin", [EOT, 5, 5, 5, 9, 9, 7, 300, 300, 300, 300])
    write_shard(tmp_path / "t_val_000000.bin", [EOT, 5, 11])
    corpus = compact_corpus(tmp_path, vocab_size=4)
    # kept: EOT (always), 300 (4×), 5 (3×), in id order: 5 -> 0, 300 -> 1, EOT -> 2; 9, 7, 11 -> 3
    assert corpus.train.tolist() == [2, 0, 0, 0, 3, 3, 3, 1, 1, 1, 1]
    assert corpus.val.tolist() == [2, 0, 3] and corpus.bos == 2
    assert corpus.coverage == pytest.approx(8 / 11)


def test_lane_batches_give_every_row_its_own_lane_and_each_input_token_once():
    tokens = torch.arange(100)
    batches = list(lane_batches(tokens, rows=2, seq_len=4, steps=3))
    assert batches[0][0].tolist() == [[0, 1, 2, 3], [12, 13, 14, 15]]
    assert batches[1][0].tolist() == [[4, 5, 6, 7], [16, 17, 18, 19]]
    assert all(torch.equal(y, x + 1) for x, y in batches)  # targets: the next token
    assert sorted(torch.cat([x.flatten() for x, _ in batches]).tolist()) == list(range(24))
    with pytest.raises(ValueError, match="would repeat"):
        lane_batches(tokens, rows=5, seq_len=4, steps=5)  # 100 inputs and one more target


def test_spread_batches_take_evenly_spaced_windows_over_the_whole_val_split():
    batches = spread_batches(torch.arange(1000), rows=2, seq_len=4, n_tokens=16)
    starts = [int(row[0]) for x, _ in batches for row in x]
    assert starts == [0, 248, 496, 744]  # (1000 − 5) // 4 apart
    with pytest.raises(ValueError, match="val_tokens=12"):
        spread_batches(torch.arange(1000), rows=2, seq_len=4, n_tokens=12)


def test_the_schedule_holds_then_cools_down_and_warms_momentum_up():
    lr_factor = experiment_schedule(100, 128).lr_factor
    momentum_at = experiment_schedule(1750, 128).momentum_at
    assert [lr_factor(s) for s in (0, 54)] == [1.0, 1.0] and lr_factor(55) == pytest.approx(1.0)
    assert lr_factor(100) == pytest.approx(0.1) and lr_factor(78) == pytest.approx(0.54)
    assert momentum_at(0) == 0.85 and momentum_at(300) == pytest.approx(0.95)
    assert momentum_at(150) == pytest.approx(0.90) and momentum_at(1000) == pytest.approx(0.95)


def test_train_refuses_to_repeat_training_tokens():
    corpus = stdlib_corpus(quick=True, vocab_size=256)
    settings = dict(gpt_optimizers.SETTINGS["quick"], steps=10**6)
    with pytest.raises(ValueError, match="would repeat"):
        train(None, None, corpus, settings)


def test_runner_runs_each_spec_once_and_resumes_from_its_cache(tmp_path):
    calls = []

    def work(spec):
        calls.append(spec["k"])
        return {"twice": 2 * spec["k"]}

    cache = tmp_path / "runs.jsonl"
    runner = Runner(work, cache, workers=1)
    assert [runner.submit({"k": k}).result() for k in (1, 2, 1)] == [{"twice": 2}, {"twice": 4}, {"twice": 2}]
    resumed = Runner(work, cache, workers=1)
    assert resumed.submit({"k": 2}).result() == {"twice": 4} and calls == [1, 2]


def test_sweep_log2_grows_past_an_edge_holding_the_best():
    tried = []

    def run_at(k):
        tried.append(k)
        done = Future()
        done.set_result({"final_val_loss": abs(k + 6)})  # best at 2^-6
        return done

    runs = sweep_log2(run_at, -3, max_extend=2)
    assert tried == [-4, -3, -2, -5, -6]  # grows downwards twice, then stops (max_extend)
    assert list(runs) == [-6, -5, -4, -3, -2]


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(0, 10.0), (10, 6.0), (20, 4.0), (30, 3.0)]
    assert steps_to_reach(curve, 5.0) == pytest.approx(15.0)
    assert steps_to_reach(curve, 3.0) == pytest.approx(30.0)
    assert steps_to_reach(curve, 2.0) is None
    assert steps_to_reach([(0, 10.0), (10, None), (20, 4.0)], 5.0) is None  # diverged at 10


# ---- MLP helpers ---------------------------------------------------------------------------------


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
    [(lr_transfer, ["--widths", "32,x"]), (depth, ["--depths", "1,4"]), (gpt_optimizers, ["--workers", "0"]),
     (gpt_optimizers, ["--run", "adamw:hidden=-6"]), (gpt_optimizers, ["--contenders", "sgd"]),
     (gpt_depth, ["--depths", "1,4"]), (gpt_depth, ["--run", "plain:4:x"])],
)
def test_bad_flags_stop_with_a_usage_error(module, flags, capsys):
    with pytest.raises(SystemExit) as stop:
        module.main(["--quick", *flags])
    assert stop.value.code == 2 and flags[0] in capsys.readouterr().err


def test_out_that_is_a_file_stops_with_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        depth.main(["--quick", "--out", str(tmp_path / "file")])
