"""tools.parity: the step-parity tool against a record-format reference written with our own code
(tests/fixtures/parity_reference.py), and its loader's CPU substitutions on small scripts.

The runs are tiny (width 128: one head of 128; 256-token batches; the record's 12 layers and 50304-row
tables), on a synthetic shard: documents of 100 random tokens, each after a BOS.
"""

import argparse
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.shards import write_shard
from model import PRESETS
from model.attention import dense_mask, flex_block_mask
from tools import parity
from tools.parity_record import dense_block_mask, listed_blocks, load_reference
from tools.parity_source import StandIns, load_definitions, read_source
from tools.parity_table import Entry, NameTableError, resolve_table

FIXTURE = Path(__file__).parent / "fixtures" / "parity_reference.py"
SMALL = ["--width", "128", "--seq-len", "256", "--threads", "2"]
KINDS = ("hidden", "embed", "value_embed", "head", "scalar")  # the 2025-07-12 format's: it has no gates


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("parity_data")
    rng = np.random.default_rng(0)
    documents = [np.concatenate([[50256], rng.integers(0, 50000, 100)]) for _ in range(200)]
    write_shard(directory / "synthetic_train_000000.bin", np.concatenate(documents))
    return directory


def perturbed(tmp_path: Path, old: str, new: str) -> Path:
    """The fixture with one constant changed, as a user would edit a reference script."""
    source = FIXTURE.read_text()
    assert old in source
    path = tmp_path / "perturbed.py"
    path.write_text(source.replace(old, new))
    return path


def run(reference: Path, data: Path, *flags: str) -> parity.Report:
    args = parity.parse_args(["--reference", str(reference), "--data", str(data), *SMALL, *flags])
    return parity.run(args, out=io.StringIO())


@pytest.fixture(scope="module")
def equal_run(shard_dir) -> parity.Report:
    return run(FIXTURE, shard_dir, "--steps", "0-2", "--check-steps", "2", "--no-floor")


# ---- (a) a reference equal to ours ----------------------------------------------------------------


def test_a_reference_equal_to_ours_has_the_same_losses(equal_run):
    # Same code, weights and tokens. The reference's loss is a sum: its gradients are 256x ours and its
    # ε's (Adam's, Newton–Schulz's) are 256x ours, exact in binary, so every figure is bit-identical.
    assert not equal_run.failures
    assert [row.step for row in equal_run.steps] == [0, 1, 2]
    assert [row.loss_diff for row in equal_run.steps] == [0.0] * 3
    assert equal_run.steps[2].loss_ref != equal_run.steps[0].loss_ref  # and the models did train


def test_a_reference_equal_to_ours_makes_the_same_updates(equal_run):
    for row in equal_run.steps:
        assert row.update == dict.fromkeys(KINDS, 0.0), row
    (check,) = equal_run.checks
    assert check.update == dict.fromkeys(KINDS, 0.0)
    assert 0 < check.floor["hidden"] < 1e-4  # float32 against float64 Newton–Schulz: rounding level


# ---- (b) a perturbed reference is caught ------------------------------------------------------------


def test_a_changed_lr_multiplier_is_caught_by_the_one_step_check_and_the_exit_status(tmp_path, shard_dir,
                                                                                     capsys):
    # Head lr 0.008 x 25 against our 0.22 = 0.008 x 27.5: |u_ref - u_ours| / |u_ref| = 27.5/25 - 1. (From
    # the initial weights only the head has a gradient: the output projections start at zero.)
    changed = perturbed(tmp_path, "HEAD_LR_MUL = 27.5", "HEAD_LR_MUL = 25.0")
    flags = ["--reference", str(changed), "--data", str(shard_dir), *SMALL, "--steps", "none",
             "--check-steps", "1", "--no-floor"]
    assert parity.main(flags) == 1
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "FAIL" in line]
    measured = float(re.search(r"head update difference ([0-9.e+-]+)", line).group(1))
    assert measured == pytest.approx(27.5 / 25 - 1, rel=1e-3)
    zeros = dict.fromkeys(KINDS, 0.0)
    report = parity.Report({}, checks=[parity.CheckRow(1, {**zeros, "head": measured}, zeros)])
    head_tol = {**parity.STEP_TOLERANCES, "head": 0.1}  # --step-tol head=0.1
    assert parity.verdicts(report, parity.LOSS_FACTOR, 0.0, head_tol) == []


def test_the_loss_verdict_allows_loss_factor_times_the_floor_and_no_more():
    zeros = dict.fromkeys(KINDS, 0.0)
    report = parity.Report({}, steps=[parity.StepRow(2, 128, 6.0, 6.0015, 6.001, zeros, zeros),
                                      parity.StepRow(3, 128, 5.0, 5.0, 5.0002, zeros, zeros)])
    # ours 1.5e-3 from the record, the twin's largest 1.0e-3 (step 2's, not step 3's)
    assert parity.verdicts(report, parity.LOSS_FACTOR, 0.0, parity.STEP_TOLERANCES) == []
    assert parity.verdicts(report, 1.0, 0.0, parity.STEP_TOLERANCES) == [
        "FAIL: loss difference +1.5e-03 (ours - record) at step 2 exceeds --loss-factor 1 x the floor "
        "1.0e-03 + --loss-tol 0"]
    assert parity.verdicts(report, 1.0, 6e-4, parity.STEP_TOLERANCES) == []  # --loss-tol 6e-4
    report.steps[0].loss_ours = 6.0025  # beyond twice the floor
    assert len(parity.verdicts(report, parity.LOSS_FACTOR, 0.0, parity.STEP_TOLERANCES)) == 1


def test_the_loss_factor_defaults_to_two_and_must_be_positive(capsys):
    assert parity.parse_args(["--reference", str(FIXTURE)]).loss_factor == parity.LOSS_FACTOR == 2.0
    with pytest.raises(SystemExit):
        parity.parse_args(["--reference", str(FIXTURE), "--loss-factor", "0"])
    assert "--loss-factor must be positive, got 0" in capsys.readouterr().err


def test_a_changed_mask_is_caught_by_the_loss(tmp_path, shard_dir):
    # The other window rule than the preset's: from step 2 on (once the zero-initialized output
    # projections have moved) the attention output reaches the loss.
    other = "token" if PRESETS["124m"].window_rule == "block" else "block"
    report = run(perturbed(tmp_path, 'WINDOW_RULE = "preset"', f'WINDOW_RULE = "{other}"'), shard_dir,
                 "--steps", "0-2", "--check-steps", "none")
    # Step 1 moves the output projections by gradients that go through the mask: measured 0.4 of the
    # update's norm apart, against a floor of 0.2. Step 2's loss then differs: measured 9.5x the floor.
    assert report.steps[1].update["hidden"] > 1.5 * report.steps[1].update_floor["hidden"]
    assert abs(report.steps[2].loss_diff) > 5 * abs(report.steps[2].floor_diff)
    assert any("loss difference" in line for line in report.failures)


# ---- (c) the name table fails loudly ----------------------------------------------------------------


def test_a_reference_parameter_missing_from_the_name_table_stops_the_run_naming_it(tmp_path, shard_dir):
    with pytest.raises(SystemExit, match=r"reference parameter extra_gain \(1,\) is not in the name table"):
        run(perturbed(tmp_path, "EXTRA_PARAMETER = False", "EXTRA_PARAMETER = True"), shard_dir)


def test_our_parameter_missing_from_the_name_table_stops_the_run_naming_it():
    ours = parity.build_ours(128, 256, seed=0)
    ref, _ = load_reference(FIXTURE, 128, seq_len=256)
    rules = [r for r in ref.rules if r[0] != "lm_head.weight"] + [("lm_head.weight", "embed.weight", "head")]
    with pytest.raises(NameTableError, match=r"our parameter embed.weight is mapped twice"):
        resolve_table(rules, ref.scalar_entries(), ref.model, ours.model)
    no_skips = [e for e in ref.scalar_entries() if e.ours != "skip_weights"]
    no_skips.append(Entry("scalars", slice(0, 6), None, "scalar"))
    with pytest.raises(NameTableError, match=r"our parameter skip_weights \(6,\) has no reference"):
        resolve_table(ref.rules, no_skips, ref.model, ours.model)


# ---- the loader ---------------------------------------------------------------------------------------


def test_a_record_log_is_read_up_to_its_first_line_of_equals_signs(tmp_path):
    log = tmp_path / "record.txt"
    log.write_text(FIXTURE.read_text() + "=" * 100 + "\nRunning Python 3.10\n" + "=" * 100 + "\n")
    assert read_source(log) == FIXTURE.read_text()


SCRIPT = '''
import torch
torch.empty(1, device="cuda").backward()

@torch.library.custom_op("parity_test::mm", mutates_args=())
def mm_op(x: torch.Tensor) -> torch.Tensor:
    return x

@mm_op.register_fake
def _(x):
    return x

@torch.compile
def zeropower(G, steps):
    return G.float()

def window():
    return torch.tensor(3, dtype=torch.int32, pin_memory=True).cuda(non_blocking=True)

def update(g):
    return zeropower(g.bfloat16(), 5), torch.arange(2, device="cuda")

class Hyperparameters:
    steps = 7

args = Hyperparameters()
limit = 2 ** 10
raise SystemExit("the main body ran")
'''


def test_the_loader_keeps_definitions_only_and_moves_them_to_the_cpu():
    loaded = load_definitions(SCRIPT, StandIns("zeropower"))
    ns = loaded.namespace
    assert loaded.substitutions == {"custom operator dropped (the FP8 head)": 2, "torch.compile removed": 1,
                                    "pin_memory=True -> False": 1, ".cuda() -> .cpu()": 1,
                                    "Newton-Schulz input .bfloat16() -> .to(NS_DTYPE)": 1,
                                    'device="cuda" -> "cpu"': 1}
    assert "mm_op" not in ns and ns["args"].steps == 7 and ns["limit"] == 1024
    assert ns["window"]().device.type == "cpu"
    g = torch.randn(3, 3)
    ns["NS_DTYPE"] = torch.float32
    assert torch.equal(ns["update"](g)[0], g)  # float32 end to end: the bf16 cast is gone
    assert ns["rank"] == 0 and ns["world_size"] == 1


def test_a_block_mask_made_dense_is_the_rule_it_encodes():
    # Our own FlexAttention block masks (both window rules, documents) expanded by the tool equal the
    # dense masks of the same rules, on 3 documents over 4 blocks and windows inside and past a block.
    T = 512
    idx = torch.zeros(1, T, dtype=torch.long)
    idx[0, [0, 100, 300]] = 50256
    docs = (idx == 50256).cumsum(-1)
    for rule in ("token", "block"):
        for window in (1, 64, 128, 200, 1000):
            w = torch.tensor(window)
            dense = dense_block_mask(flex_block_mask(T, w, docs, "cpu", rule), T, T)
            assert torch.equal(dense[0, 0], dense_mask(T, w, docs, "cpu", rule)[0, 0]), (rule, window)


def test_zero_or_negative_block_counts_list_no_block():
    num = torch.tensor([[[2, 0, -1]]], dtype=torch.int32)
    indices = torch.tensor([[[1, 0, 2], [0, 1, 2], [2, 1, 0]]], dtype=torch.int32)[None]
    table = listed_blocks(num, indices, 3)
    assert table[0, 0].tolist() == [[True, True, False], [False] * 3, [False] * 3]


def test_steps_flags_parse_ranges_and_lists():
    assert parity.step_list("0-3,1000") == [0, 1, 2, 3, 1000]
    assert parity.step_list("none") == []
    assert list(parity.segments([0, 1, 2, 1000, 1500])) == [[0, 1, 2], [1000], [1500]]
    with pytest.raises(argparse.ArgumentTypeError, match="0..2160"):  # record #46's schedule, the longest
        parity.step_list("2161")
    with pytest.raises(SystemExit, match="the 2025-07-12 schedule has steps 0..1750, got 1751"):
        parity.run(parity.parse_args(["--reference", str(FIXTURE), "--steps", "1751"]))


KEPT_COMPILE = '''
import torch

class Adam:
    @torch.compile
    @torch.no_grad()
    def step(self, x):
        return x.sqrt().add_(1e-8)

    @torch.compile
    def sync(self, x):
        return x

def zeropower(G):
    return G.bfloat16()
'''


def test_the_loader_keeps_torch_compile_on_the_methods_the_adapter_names_only():
    loaded = load_definitions(KEPT_COMPILE, StandIns("zeropower", compiled=frozenset({"Adam.step"})))
    ns = loaded.namespace
    assert loaded.substitutions == {"torch.compile kept on Adam.step (inductor, CPU)": 1,
                                    "torch.compile removed": 1,
                                    "Newton-Schulz input .bfloat16() -> .to(NS_DTYPE)": 1}
    assert hasattr(ns["Adam"].step, "_torchdynamo_orig_callable")  # torch.compile's wrapper
    assert not hasattr(ns["Adam"].sync, "_torchdynamo_orig_callable")
    assert sys.modules[ns["__name__"]].__dict__ is ns  # dynamo imports the globals' module by name
