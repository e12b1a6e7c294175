"""tools.parity against record #46's format: the CPU stand-ins for its kernels and FlashAttention-3, the
loader's substitutions and the Record20251129 adapter on a reference written with our own code
(tests/fixtures/parity_reference46.py: width 128, the record's 12 layers and 50304-row tables, 8
micro-batches of 256 tokens), on a synthetic shard of random documents (ids 0-499) after BOS tokens."""

import dataclasses
import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.shards import write_shard
from tools import parity, parity46
from tools.parity_ours46 import (
    build_ours46,
    check_segments_start_at_bos,
    compare_schedules,
    our_config,
    schedule_report,
)
from tools.parity_record import load_reference
from tools.parity_record46 import ba_plus_caa, flash_attn_varlen_sdpa, xxt
from tools.parity_source import NS_CAST, Unavailable, one_process_group
from tools.parity_table import NameTableError, resolve_table

FIXTURE = Path(__file__).parent / "fixtures" / "parity_reference46.py"
ZERO_HEAD_LOSS = math.log(50304)  # uniform logits over the padded vocabulary


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("parity46_data")
    rng = np.random.default_rng(0)
    # tokens from 500 ids: a unigram signal the head learns from its first step (uniform ids have none)
    documents = [np.concatenate([[50256], rng.integers(0, 500, rng.integers(40, 300))]) for _ in range(300)]
    write_shard(directory / "synthetic_train_000000.bin", np.concatenate(documents))
    return directory


# ---- the stand-ins ------------------------------------------------------------------------------------


def test_the_symmetric_products_are_the_kernels_math_and_exactly_symmetric():
    A = torch.randn(3, 40, 70, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = xxt(A, torch.empty(3, 40, 40, dtype=torch.bfloat16))
    exact = (A.double() @ A.double().mT).bfloat16()  # float32 sums of exact products, one rounding
    assert torch.equal(out, out.mT)
    assert (out.float() - exact.float()).abs().max() <= 2 ** -7 * exact.float().abs().max()
    assert torch.equal(out.tril(), (A.float() @ A.float().mT).bfloat16().tril())
    B = ba_plus_caa(out, alpha=2.0, beta=-3.0, out=torch.empty_like(out))
    expected = 2.0 * (out.float() @ out.float().mT) - 3.0 * out.float()
    assert torch.equal(B, B.mT) and torch.equal(B.tril(), expected.bfloat16().tril())


def dense_varlen_mask(cu_seqlens: torch.Tensor, T: int, window: int) -> torch.Tensor:
    """(T, T): same segment of cu_seqlens and 0 <= i - j <= window, from the definition."""
    segment = torch.searchsorted(cu_seqlens, torch.arange(T), right=True)
    gap = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    return (segment[:, None] == segment[None, :]) & (gap >= 0) & (gap <= window)


@pytest.mark.parametrize("window", [0, 5, 40, 1000])
def test_the_varlen_stand_in_is_sdpa_under_the_dense_segment_and_window_mask(window):
    T, H, D = 96, 2, 16
    q, k, v = torch.randn(3, T, H, D, generator=torch.Generator().manual_seed(window)).unbind(0)
    cu = torch.tensor([0, 10, 11, 50, 96, 96, 96], dtype=torch.int32)  # padded with T, as the record's
    y = flash_attn_varlen_sdpa(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64,
                               causal=True, softmax_scale=0.3, window_size=(window, 0))
    mask = dense_varlen_mask(cu, T, window)
    dense = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(y, dense.transpose(0, 1), rtol=1e-5, atol=1e-6)
    assert int(mask[70].sum()) == min(window + 1, 70 - 50 + 1)  # W + 1 keys, cut at its segment's start


def test_the_varlen_stand_in_refuses_what_it_does_not_reproduce():
    q = torch.zeros(32, 1, 8)
    cu = torch.tensor([0, 32], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="non-causal"):
        flash_attn_varlen_sdpa(q, q, q, cu, cu, 32, 32, causal=False, softmax_scale=1.0, window_size=(4, 0))
    with pytest.raises(ValueError, match="exceeds max_seqlen"):
        flash_attn_varlen_sdpa(q, q, q, cu, cu, 16, 16, causal=True, softmax_scale=1.0, window_size=(4, 0))


# ---- the loader and the adapter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stepped(shard_dir):
    """The fixture built by the adapter and trained 4 steps from step 0: per step (float32 loss, its
    training loss) per token and every parameter's change."""
    rows = []
    torch.manual_seed(0)
    with one_process_group(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.distributed\..*` is deprecated", FutureWarning)
        ref, substitutions = load_reference(FIXTURE, 128, batch_divisor=64)
        ref.open_data(str(shard_dir / "*_train_*.bin"), 0)
        for step in range(4):
            before = {n: p.detach().float().clone() for n, p in ref.model.named_parameters()}
            batch = ref.batches(step)
            tokens = sum(t.numel() for _, t, _ in batch)
            loss = ref.float_loss(batch, step) / tokens
            trained = ref.forward_backward(batch, step) / tokens
            ref.step(step)
            moved = {n: not torch.equal(p.detach().float(), before[n])
                     for n, p in ref.model.named_parameters()}
            rows.append((loss, trained, moved, tokens))
    return ref, substitutions, rows


def test_the_loader_strips_the_gpu_parts_and_counts_each_substitution(stepped):
    ref, substitutions, _ = stepped
    assert substitutions == {
        "import triton dropped (GPU-only)": 1, "import triton.language dropped (GPU-only)": 1,
        "import kernels dropped (GPU-only)": 1, "GPU kernel dropped": 1,
        "XXT -> PyTorch X Xᵀ (tools.parity_record46.xxt)": 1,
        "ba_plus_cAA -> PyTorch b A + c A² (tools.parity_record46.ba_plus_caa)": 1, NS_CAST: 1,
        "FA3 flash_attn_varlen_func -> SDPA with the dense segment and window mask, per segment": 1,
        'device = "cpu" (line 1261)': 1}
    ns = ref.ns
    assert ns["XXT"] is xxt and ns["flash_attn_interface"].flash_attn_varlen_func is flash_attn_varlen_sdpa
    assert isinstance(ns["triton"], Unavailable) and "scale_kernel" not in ns
    with pytest.raises(RuntimeError, match="tl.arange is GPU-only"):
        ns["tl"].arange(4)
    G = torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
    ns["NS_DTYPE"] = torch.float32
    assert ns["polar_express"](G).dtype == torch.float32  # the bf16 cast is switchable
    ns["NS_DTYPE"] = torch.bfloat16
    assert ns["polar_express"](G).dtype == torch.bfloat16


def test_the_adapter_builds_as_the_main_body_does(stepped):
    ref, _, _ = stepped
    model = ref.model
    bf16 = (model.embed.weight, model.lm_head.weight, model.smear_gate.weight,
            model.blocks[1].attn.attn_gate.weight)
    assert all(p.dtype == torch.bfloat16 for p in bf16)
    assert model.blocks[1].attn.qkvo_w.dtype == torch.float32 and not model.lm_head.use_fp8  # DISABLE_FP8
    adam, muon = ref.optimizers
    assert {id(p) for g in adam.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if n in ("scalars", "lm_head.weight") or "embed" in n}
    assert sum(len(g["params"]) for g in muon.param_groups) == 10 + 10 + 22 + 1  # qkvo, gates, mlp, smear
    assert [g["initial_lr"] for g in adam.param_groups] == [0.008]



def test_the_float32_storage_diagnostic_converts_the_heads_gates_and_adams_moments_in_place():
    with one_process_group(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.distributed\..*` is deprecated", FutureWarning)
        ref, _ = load_reference(FIXTURE, 128, batch_divisor=64)
    model, adam = ref.model, ref.adam
    params = {id(p) for opt in ref.optimizers for g in opt.param_groups for p in g["params"]}
    ref.store_float32()
    assert all(p.dtype == torch.float32 for p in (model.lm_head.weight, model.smear_gate.weight,
                                                  model.blocks[1].attn.attn_gate.weight))
    assert model.embed.weight.dtype == model.value_embeds[0].weight.dtype == torch.bfloat16
    assert {s["exp_avg"].dtype for s in adam.state.values()} == {torch.float32}
    assert {s["exp_avg_sq"].dtype for s in adam.state.values()} == {torch.float32}
    assert {id(p) for opt in ref.optimizers for g in opt.param_groups for p in g["params"]} == params

def test_the_first_losses_are_the_zero_heads_and_adam_moves_only_on_odd_steps(stepped):
    _, _, rows = stepped
    (loss0, trained0, moved0, tokens0), (loss1, _, moved1, _), (loss2, *_), (_, _, moved3, tokens3) = rows
    assert tokens0 == tokens3 == 8 * 256
    assert loss0 == pytest.approx(ZERO_HEAD_LOSS, abs=1e-5) and trained0 == pytest.approx(loss0, rel=1e-6)
    assert loss1 == pytest.approx(ZERO_HEAD_LOSS, abs=1e-5)  # Adam (the head) waits for the odd step
    assert loss2 < loss1 - 0.02  # measured 10.826 -> 10.785 (the first head step)
    adam_params = ("lm_head.weight", "embed.weight", "scalars")
    assert not any(moved0[n] for n in adam_params) and moved1["lm_head.weight"] and moved3["embed.weight"]
    assert moved1["blocks.1.attn.qkvo_w"] is False  # zero head: no gradient below it on steps 0-1
    assert moved3["blocks.1.attn.qkvo_w"] and moved3["blocks.1.mlp.c_fc"]


def test_yarn_follows_the_long_windows_the_record_has_passed(stepped):
    ref, _, _ = stepped
    rotary = ref.model.ours[0].blocks[1].attn.rotary
    for step, path in ((706, [3]), (707, [3, 7]), (2000, [3, 7, 11]), (2120, [3, 7, 11, 13]), (0, [3])):
        ref.follow_yarn(step)
        assert ref.yarn_windows == path
    assert float(rotary.attn_scale) == pytest.approx(0.1)  # back at step 0: reset


def test_the_name_table_covers_both_models_with_the_records_layouts(stepped):
    ref, _, _ = stepped
    ours = parity46.our_model(128)
    table = ref.table(ours)
    assert len(table) == 38 + 2 * 10 + 29  # rules 1 + 3 + 1 + 10 + 11 + 11 + 1, qkvo halves, scalars
    fc = next(e for e in table if e.reference == "blocks.1.mlp.c_fc")
    assert fc.view(ref.model.blocks[1].mlp.c_fc).shape == (512, 128) == ours.blocks[1].mlp.fc.weight.shape
    # the smear gate and the 10 attention layers' gates (bf16 in the record) are reported apart from the
    # float32 hidden matrices
    gates = {"smear.gate.weight", *(f"blocks.{i}.attn.gate.weight" for i in (1, 2, 3, 4, 5, 6, 8, 9, 10, 11))}
    assert {e.ours for e in table if e.kind == "gate"} == gates
    assert {e.reference for e in table if e.kind == "gate"} == {
        "smear_gate.weight", *(f"blocks.{i}.attn.attn_gate.weight" for i in (1, 2, 3, 4, 5, 6, 8, 9, 10, 11))}
    rules = [r[:3] if r[0] == "blocks.{i}.mlp.c_fc" else r for r in ref.rules]  # forget the transpose
    with pytest.raises(NameTableError, match=r"blocks.1.mlp.c_fc \(128, 512\) and our blocks.1.mlp.fc.weight "
                                             r"\(512, 128\) differ in shape"):
        resolve_table(rules, ref.entries(), ref.model, ours)


def test_the_batch_divisor_divides_the_schedule_or_stops_naming_itself():
    with one_process_group():
        ref, _ = load_reference(FIXTURE, 128, batch_divisor=2)
        assert [ref.ns["get_bs"](s) for s in (0, 707, 1414, 2120)] == [65536, 131072, 196608, 196608]
        with pytest.raises(SystemExit, match="--batch-divisor 3: the record's batch sizes"):
            load_reference(FIXTURE, 128, batch_divisor=3)


# ---- our side -------------------------------------------------------------------------------------------


def test_our_schedules_are_the_records_functions_at_every_step(stepped):
    """The fixture's get_lr, get_muon_momentum, get_ws, get_bs are record #46's schedules, its batch
    sizes over 64 (tests/fixtures/parity_reference46.py)."""
    ref, _, _ = stepped
    found = {a.name: a for a in compare_schedules(ref.ns, our_config(), 64)}
    assert [found[n].differ for n in ("lr", "momentum", "windows", "batch")] == [[], [], [], []]
    line, error = schedule_report(ref.ns, our_config(), 64)
    assert error is None and line.endswith("lr equal; momentum equal; windows equal; batch equal")


def test_a_momentum_a_last_bit_away_from_the_records_stops_the_run(stepped):
    # The 2025-07-12 record's blend, (1 - f) 0.85 + f 0.95: the same warm-up but for the last bit at some
    # steps, enough to move bf16 Newton-Schulz's input roundings.
    ref, _, _ = stepped
    _, error = schedule_report(ref.ns, dataclasses.replace(our_config(), momentum_blend="weighted"), 64)
    assert "momentum differs at 89 steps (first 2), by at most 1.3e-16 relative" in error


@pytest.mark.parametrize(("change", "named"), [
    (dict(cooldown_frac=0.5), "lr differs at 1165 steps (first 955)"),
    (dict(window_blocks=(3, 7, 11, 15)), "windows differs at 41 steps (first 2120)"),
    (dict(tokens_schedule=(131072, 262144, 393216, 524288)), "batch differs at 41 steps (first 2120)")])
def test_a_schedule_that_is_not_the_records_stops_the_run_naming_it(stepped, change, named):
    ref, _, _ = stepped
    _, error = schedule_report(ref.ns, dataclasses.replace(our_config(), **change), 64)
    assert error.startswith("error: tools.parity: --preset speedrun's ") and named in error


# ---- the run --------------------------------------------------------------------------------------------


def run_args(shard_dir: Path, *flags: str) -> list[str]:
    return ["--reference", str(FIXTURE), "--data", str(shard_dir), "--width", "128", "--threads", "2",
            "--batch-divisor", "64", *flags]


def test_ours_beside_the_record_and_its_twin_from_our_weights(monkeypatch, shard_dir):
    """The fixture's forward is our GPT on its tensors: from our weights (a head made nonzero, exact in
    bf16, so the record's own init, a zero head, cannot pass for them), copied through the name table,
    fed the record's micro-batches as one sequence each, ours' step-0 loss is the record's to rounding."""

    def build_with_a_head(width, seed):
        ours = build_ours46(width, seed)
        with torch.no_grad():
            head = ours.model.lm_head.weight
            noise = torch.randn(head.shape, generator=torch.Generator().manual_seed(1))
            head.copy_((0.05 * noise).bfloat16())
        return ours

    monkeypatch.setattr(parity46, "build_ours46", build_with_a_head)
    out = io.StringIO()
    args = parity.parse_args(run_args(shard_dir, "--steps", "0-1", "--check-steps", "3", "--loss-tol", "1",
                                      "--step-tol", "hidden=1", "--step-tol", "gate=1"))
    report = parity.run(args, out=out)
    assert [r.batch for r in report.rows] == [2048] * 2 and report.rows[0].windows == (128, 384)
    assert report.rows[0].loss > ZERO_HEAD_LOSS + 0.1  # our head, not the record's zero one
    assert abs(report.rows[0].diff) < 1e-4  # measured 0.0e+00 (bf16 head on both sides)
    # the twins (SDPA's math kernel; the micro-batches' gradients summed in reverse order; both): rounding
    assert [len(r.floors) for r in report.rows] == [3, 3] and all(abs(f) < 1e-3 for r in report.rows
                                                                   for f in r.floors)
    # at step 0 every loss is the record's: the kernels' sums agree here to the last bit (measured 0)
    assert report.rows[0].floors == (0.0, 0.0, 0.0)
    assert report.rows[1].update["head"] > 0  # the fixture's Adam is not ours: they differ
    assert report.table_entries == 87
    assert list(report.checks[3]) == list(parity.KINDS)  # the gates a column of their own
    assert "     floor      hidden        gate       embed value_embed" in out.getvalue()
    assert "(each twin's largest over the others': " in out.getvalue()
    # Polar Express in float32 against float64: rounding, on the float32 hidden matrices only (the bf16
    # gates' weights round it away: measured 0)
    floor = report.checks[3]
    assert 0 < floor["hidden"] < 1e-3 and [floor[k] for k in parity.KINDS[1:]] == [0.0] * 5
    one_step = report.our_checks[3]  # an odd step: DistAdam steps on what _sync_gradient sent
    # the fixture's NorMuon is a plain Muon: not ours (measured 0.68, the gates 0.80)
    assert one_step["hidden"] > 0.1 and one_step["gate"] > 0.1
    # ...so the gates' new bf16 weights lie many bf16 steps from the record's; the bf16 tables too (Adam)
    apart = report.steps_apart[3]
    assert apart["gate"] > 1 and list(apart) == ["gate", "embed", "value_embed", "head"]  # KINDS order
    # its Adam is ours but for its eager bf16 arithmetic on the bf16 weights (largest measured 1.9%) and
    # its float32 moments for the float32 scalars, where ours (the preset's adam_state_dtype) keeps bf16
    # moments (measured 1.7e-3; 7.9e-7 with float32 moments)
    assert max(one_step[k] for k in ("embed", "value_embed", "head")) < 0.05 and one_step["scalar"] < 5e-3
    assert "momentum equal" in out.getvalue()  # printed before training
    assert "GPU kernel dropped x1" in out.getvalue() and "ours - record, float32 loss" in out.getvalue()
    assert "one optimizer step at step 3, ours against the record" in out.getvalue()
    # Gradients at equal weights: sums in another order (SDPA per segment or not, bf16 sums of the record's
    # bf16 head and gates), measured 1.2e-3 to 6.8e-3, the twins' largest 1.4e-3 to 4.4e-3.
    grads, twin = report.gradients[3]
    assert all(0 < grads[k] < 0.02 and 0 < twin[k] < 0.02 for k in parity.KINDS)
    assert "gradients at step 3 from our weights, ours against the record" in out.getvalue()
    assert report.failures == []  # within the floor + --loss-tol 1; its Muon: --step-tol hidden=1 gate=1


def test_the_verdict_holds_each_kinds_one_step_to_its_floor_or_tolerance():
    zero = dict.fromkeys(parity.KINDS, 0.0)
    row = parity46.Row(2, 2048, (128, 384), 6.0, 6.0, (-4e-4, 1e-3, 2e-4), zero, ours=6.0005, update=zero)
    report = parity46.Report46({}, 87, [row], ours=True)
    report.checks[1801] = dict(zero, hidden=2.8e-5)  # the record's float32-vs-float64 floor
    report.our_checks[1801] = dict(zero, hidden=3e-5, gate=2.9e-3, head=0.02, scalar=4e-3)  # as measured
    tolerances = parity46.STEP_TOLERANCES_46
    assert parity46.verdict(report, 2.0, 0.0, tolerances) == []
    report.our_checks[1801].update(hidden=2.4e-4, gate=0.0)  # the gates' difference on the hidden matrices
    assert parity46.verdict(report, 2.0, 0.0, tolerances) == [
        "one step at 1801: hidden 2.4e-04 exceeds max(floor 2.8e-05, --step-tol hidden=0.0001)"]
    report.our_checks[1801].update(hidden=3e-5)
    report.our_checks[1801]["head"] = 0.04
    assert parity46.verdict(report, 2.0, 0.0, tolerances) == [
        "one step at 1801: head 4.0e-02 exceeds max(floor 0.0e+00, --step-tol head=0.03)"]
    assert parity46.verdict(report, 2.0, 0.0, {**tolerances, "head": 0.05}) == []  # --step-tol head=0.05
    report.our_checks[1801].update(head=0.0, hidden=2e-3)
    report.checks[1801]["hidden"] = 3e-3  # a floor above the tolerance allows up to it
    assert parity46.verdict(report, 2.0, 0.0, tolerances) == []
    row.ours = 6.0015  # ours - record 1.5e-3 against a floor of 1e-3: within --loss-factor 2, not 1
    assert parity46.verdict(report, 2.0, 0.0, tolerances) == []
    assert parity46.verdict(report, 1.0, 0.0, tolerances) == [
        "loss difference +1.5e-03 (ours - record) at step 2 exceeds --loss-factor 1 x the floor 1.0e-03 "
        "+ --loss-tol 0"]
    row.ours = 6.0025
    assert parity46.verdict(report, 2.0, 0.0, tolerances) == [
        "loss difference +2.5e-03 (ours - record) at step 2 exceeds --loss-factor 2 x the floor 1.0e-03 "
        "+ --loss-tol 0"]


def test_bf16_steps_apart_counts_units_in_the_last_place_across_powers_of_two_and_zero():
    one_up = torch.tensor([1.0]).bfloat16().view(torch.int16) + 1  # 1 + 2^-7
    assert parity46.bf16_steps_apart(torch.tensor([1.0]), one_up.view(torch.bfloat16).float()) == 1
    assert parity46.bf16_steps_apart(torch.tensor([2.0]), torch.tensor([2.0 - 2.0 ** -7])) == 1
    tiny = 2.0 ** -133  # the smallest positive bf16
    assert parity46.bf16_steps_apart(torch.tensor([tiny, 0.0]), torch.tensor([-tiny, -0.0])) == 2
    three_down = torch.tensor([0.5, -3.0 - 3 * 2.0 ** -6])  # bf16's step in [2, 4) is 2^-6
    assert parity46.bf16_steps_apart(torch.tensor([0.5, -3.0]), three_down) == 3


def test_a_bf16_kind_one_rounding_from_the_record_passes_beyond_its_tolerance():
    zero = dict.fromkeys(parity.KINDS, 0.0)
    row = parity46.Row(2, 2048, (128, 384), 6.0, 6.0, (1e-3,), zero, ours=6.0, update=zero)
    report = parity46.Report46({}, 87, [row], ours=True)
    report.checks[1801] = zero
    report.our_checks[1801] = dict(zero, gate=1.2e-2)  # seed 6: two of 132 entries a bf16 step apart
    report.steps_apart[1801] = {"gate": 1, "embed": 0, "value_embed": 0, "head": 0}
    tolerances = parity46.STEP_TOLERANCES_46
    assert parity46.verdict(report, 2.0, 0.0, tolerances) == []
    report.steps_apart[1801]["gate"] = 2
    assert parity46.verdict(report, 2.0, 0.0, tolerances) == [
        "one step at 1801: gate 1.2e-02 exceeds max(floor 0.0e+00, --step-tol gate=0.01), its bf16 weights "
        "up to 2 steps apart"]
    report.our_checks[1801]["hidden"] = 2e-4  # float32: no bf16 steps to excuse it
    assert len(parity46.verdict(report, 2.0, 0.0, tolerances)) == 2


def test_the_reversed_twin_sums_the_same_gradients_in_another_order(shard_dir):
    with one_process_group(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.distributed\..*` is deprecated", FutureWarning)
        record, twin = (load_reference(FIXTURE, 128, batch_divisor=64)[0] for _ in range(2))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # off the zero head and projections: every weight gets a gradient
            for p in record.model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        twin.model.load_state_dict(record.model.state_dict())
        record.open_data(str(shard_dir / "*_train_*.bin"), 0)
        batches = record.batches(0)
        sides = parity46.Side(record, None), parity46.Side(twin, None, reverse=True)
        assert sides[1].fed(batches) == batches[::-1] and sides[0].fed(batches) == batches
        for side in sides:
            side.ref.forward_backward(side.fed(batches), 0)
    grads = [{n: p.grad for n, p in side.ref.model.named_parameters()} for side in sides]
    differences = {torch.float32: [], torch.bfloat16: []}
    for name, grad in grads[0].items():
        other = grads[1][name].float()
        differences[grad.dtype].append(float((grad.float() - other).norm() / grad.float().norm()))
    # the float32 sums differ in their last bits (measured up to 1.5e-9, 28 of 33 tensors), the bf16
    # ones (the head, gates and tables) by bf16 roundings (up to 8.2e-3, all 16)
    float32, bf16 = differences[torch.float32], differences[torch.bfloat16]
    assert 0 < max(float32) < 1e-7 and sum(d > 0 for d in float32) > len(float32) // 2
    assert 0 < min(bf16) and max(bf16) < 0.02


def test_each_twin_is_held_to_the_others_as_ours_is_to_them():
    zero = dict.fromkeys(parity.KINDS, 0.0)
    rows = [parity46.Row(s, 2048, (128, 384), 6.0, 6.0, floors, zero)
            for s, floors in enumerate([(1e-3, -4e-3, 2e-3), (-2e-3, 1e-3, 1e-3)])]
    # largest: 2e-3, 4e-3, 2e-3; each over the others' largest: 2/4, 4/2, 2/4
    assert parity46.twins_apart(rows) == " (each twin's largest over the others': 0.50, 2.00, 0.50)"
    assert rows[0].floor == -4e-3 and rows[1].floor == -2e-3  # the largest magnitude, its sign kept
    assert parity46.twins_apart([parity46.Row(0, 2048, (128, 384), 6.0, 6.0, (1e-3,), zero)]) == ""
    # step 0 alone (--steps 0): every twin's loss the record's to the last bit, no ratio to print
    step_0 = parity46.Row(0, 2048, (128, 384), 6.0, 6.0, (0.0, 0.0, 2e-4), zero)
    assert parity46.twins_apart([step_0]) == " (each twin's largest over the others': 0.00, 0.00, -)"


def test_the_reference_only_run_has_no_verdict(stepped, shard_dir):
    _, _, rows = stepped
    out = io.StringIO()
    args = parity.parse_args(run_args(shard_dir, "--reference-only", "--no-floor", "--steps", "0",
                                      "--check-steps", "none"))
    report = parity.run(args, out=out)
    assert report.rows[0].loss == rows[0][0] and report.rows[0].ours is None and report.failures == []
    assert "no verdict without our side" in out.getvalue()


def test_a_segment_not_starting_at_bos_stops_the_run_naming_it():
    inputs = torch.tensor([50256, 5, 6, 50256, 7, 8, 9, 10], dtype=torch.int32)
    good = (inputs, inputs.long(), torch.tensor([0, 3, 8, 8], dtype=torch.int32))
    check_segments_start_at_bos([good], 50256, 4)
    bad = (inputs, inputs.long(), torch.tensor([0, 3, 5, 8], dtype=torch.int32))
    with pytest.raises(SystemExit, match=r"step 4, micro-batch 1: the record's segment at token 5 does not "
                                         r"start at BOS 50256"):
        check_segments_start_at_bos([good, bad], 50256, 4)


def test_a_preset_that_is_not_record_46s_stops_the_run_naming_what_differs(monkeypatch, shard_dir):
    assert parity46.missing_for_ours() == []  # the preset, window rule and loader are record #46's
    monkeypatch.setitem(parity46.RECORD_46, "backout_layer", 7)
    expected = (r"^error: tools.parity: our side of record #46 lacks: --preset speedrun as record #46's "
                r"model \(model/gpt.py PRESETS\['124m-46'\]: backout_layer differ.*--reference-only")
    with pytest.raises(SystemExit, match=expected) as stopped:
        parity.main(run_args(shard_dir, "--steps", "0"))
    assert "\n" not in str(stopped.value)


def test_a_run_of_steps_from_an_odd_step_is_refused(shard_dir):
    with pytest.raises(SystemExit, match=r"--steps: a run of steps must start on an even step .* from 707"):
        parity.main(["--reference", str(FIXTURE), "--data", str(shard_dir), "--reference-only",
                     "--steps", "0-3", "--steps", "707-708"])
