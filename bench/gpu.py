"""The GPU benchmark in one command: ceilings, Newton–Schulz, optimizer steps, training steps.

    python -m bench.gpu [--smoke] [--out-dir DIR]          (or: make bench-gpu ARGS=--smoke)

Every figure is the median of repeats after a warm-up, on random non-zero data. GPU times come
from CUDA events recorded around the work (no other host sync inside a timed region), CPU times
from perf_counter; both behind `Clock`.
  ceilings        bf16 matmul TFLOP/s (8192³) and device-to-device copy bandwidth (read + write)
  newton_schulz   orthogonalize() on the 124M model's hidden matrices (12 layers of q, k, v, o
                  768×768, fc 3072×768, proj 768×3072), one stacked call per shape as Muon makes
                  them, 5 steps, per coefficient set, eager and under torch.compile; TFLOP/s and
                  the share of the measured matmul ceiling
  optimizer_step  one step over the same matrices: optim.Muon, torch.optim.Muon, fused AdamW
  train_124m      the speedrun model's compiled training step on random tokens (B=1, T=48·1024,
                  window 1792 as a tensor, dtypes and optimizer as train_gpt.py has them): ms/step,
                  tokens/s, MFU, peak memory, and optimizer.step's share of the step
  train_demo      the same for the CPU demo's model and batch
Writes gpu-<device>-<time>.json and .md under --out-dir (default bench/results/) and, unless
--smoke, appends the markdown to docs/BENCHMARKS.md. --smoke runs every section at toy sizes in
seconds on a CPU, compiling with the "eager" backend (Dynamo traces, no code is generated).
"""

import argparse
import dataclasses
import datetime
import json
import math
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from bench.optim import gpt_hidden_shapes, machine, orthogonalize_each, stacks
from data.tokenizer import VOCAB_SIZE
from model import GPT, PRESETS, GPTConfig
from optim import COEFFICIENTS, Muon, newton_schulz_flops
from training.recipe import PRESETS_TRAIN, TrainConfig, build_optimizer
from training.runlog import peak_flops
from training.runtime import autocast_dtype

REPO = Path(__file__).resolve().parents[1]
NS_STEPS = 5
GOALS = dict(newton_schulz_of_peak=0.60, optimizer_share=0.03, mfu=0.45)


@dataclass(frozen=True)
class StepCase:
    """One training-step measurement: a model, the recipe whose optimizer it uses, a batch shape."""

    model: GPTConfig
    recipe: str  # a PRESETS_TRAIN key
    batch: int
    seq_len: int
    window: int | None  # long attention window (None: full causal)
    grad_accum: int  # micro-steps per optimizer step in the recipe on one GPU


@dataclass(frozen=True)
class Plan:
    matmul_n: int
    copy_mib: int
    ns_layers: int
    ns_dim: int
    repeats: int  # timed runs per kernel-level figure
    train_steps: int  # timed training steps per case
    warmup: int  # untimed runs first (compilation happens here)
    compile_backend: str
    cases: dict[str, StepCase]


def recipe_case(recipe: str) -> StepCase:
    """The batch, window and model of a train_gpt.py recipe, one micro-step per measured step."""
    cfg = TrainConfig(preset=recipe, **PRESETS_TRAIN[recipe])
    model = dataclasses.replace(PRESETS[cfg.model], max_seq_len=cfg.seq_len)
    micro_tokens = cfg.batch_size * cfg.seq_len
    return StepCase(model, recipe, cfg.batch_size, cfg.seq_len, cfg.window_end or None,
                    cfg.tokens_per_step // micro_tokens)


def full_plan() -> Plan:
    cases = {"train_124m": recipe_case("speedrun-2025-07-12"), "train_demo": recipe_case("demo")}
    return Plan(8192, 1024, 12, 768, repeats=20, train_steps=10, warmup=3, compile_backend="inductor",
                cases=cases)


def smoke_plan() -> Plan:
    """The same sections at toy sizes: 2 layers of small matrices; the demo model (2 layers for the 124M
    stand-in) with a 1024-token vocabulary, whose 50304-wide tables would dominate a CPU's time."""
    demo = dataclasses.replace(PRESETS["demo"], vocab_size=1024, max_seq_len=64)
    stand_in = dataclasses.replace(demo, n_layer=2)
    cases = {"train_124m": StepCase(stand_in, "speedrun-2025-07-12", 1, 64, 32, 2),
             "train_demo": StepCase(demo, "demo", 2, 32, None, 1)}
    return Plan(256, 8, 2, 64, repeats=2, train_steps=2, warmup=1, compile_backend="eager", cases=cases)


# ----------------------------------------------------------------------------------------------------
# Timing


class Clock:
    """Points on the device's timeline: CUDA events on a GPU (recorded, not waited for), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        """Seconds between two marks; on a GPU this waits for `end`, so call it after the timed work."""
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def median_seconds(clock: Clock, run: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median seconds of `run` over back-to-back repeats, after `warmup` untimed runs."""
    for _ in range(warmup):
        run()
    marks = [clock.mark()]
    for _ in range(repeats):
        run()
        marks.append(clock.mark())
    return statistics.median(clock.seconds(a, b) for a, b in zip(marks, marks[1:], strict=False))


# ----------------------------------------------------------------------------------------------------
# Sections


def work_dtype(device: torch.device) -> torch.dtype:
    """Newton–Schulz's precision, hence the matmul ceiling's: bf16 on a GPU, float32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def bench_ceilings(plan: Plan, device: torch.device, clock: Clock) -> dict:
    n, dtype = plan.matmul_n, work_dtype(device)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul_s = median_seconds(clock, lambda: a @ b, plan.repeats, plan.warmup)
    src = torch.randn(plan.copy_mib * 2**18, device=device)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    copy_s = median_seconds(clock, lambda: dst.copy_(src), plan.repeats, plan.warmup)
    moved = 2 * src.nbytes
    return dict(
        matmul=dict(n=n, dtype=str(dtype), ms=matmul_s * 1e3, tflops=2 * n**3 / matmul_s / 1e12),
        copy=dict(bytes_moved=moved, ms=copy_s * 1e3, tb_per_s=moved / copy_s / 1e12),
    )


def ns_rate(flops: int, seconds: float, peak_tflops: float) -> dict:
    tflops = flops / seconds / 1e12
    return dict(ms=seconds * 1e3, tflops=tflops, of_peak=tflops / peak_tflops)


def bench_newton_schulz(plan: Plan, device: torch.device, clock: Clock, peak_tflops: float) -> dict:
    mats = stacks(gpt_hidden_shapes(plan.ns_layers, plan.ns_dim), device)
    flops = sum(newton_schulz_flops(m.shape, NS_STEPS) for m in mats)
    dtype = work_dtype(device)
    compiled = torch.compile(orthogonalize_each, fullgraph=True, dynamic=False, backend=plan.compile_backend)
    modes = {"eager": orthogonalize_each, "compiled": compiled}
    sets = {}
    for name in COEFFICIENTS:
        sets[name] = {
            mode: ns_rate(flops, median_seconds(clock, partial(fn, mats, name, dtype), plan.repeats,
                                                plan.warmup), peak_tflops)
            for mode, fn in modes.items()
        }
    return dict(stacks=[list(m.shape) for m in mats], steps=NS_STEPS, dtype=str(dtype), gflop=flops / 1e9,
                compile_backend=plan.compile_backend, sets=sets)


def bench_optimizer_step(plan: Plan, device: torch.device, clock: Clock) -> dict:
    shapes = gpt_hidden_shapes(plan.ns_layers, plan.ns_dim)
    generator = torch.Generator(device).manual_seed(0)
    cuda = device.type == "cuda"
    optimizers = {
        "optim.Muon": Muon,
        "torch.optim.Muon": partial(torch.optim.Muon, adjust_lr_fn="original"),
        "torch.optim.AdamW": partial(torch.optim.AdamW, fused=cuda, foreach=not cuda),
    }
    seconds = {}
    for name, make in optimizers.items():
        params = [torch.randn(s, device=device, generator=generator) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=generator)
        seconds[name] = median_seconds(clock, make(params).step, plan.repeats, plan.warmup)
    torch_muon = seconds["torch.optim.Muon"]
    rows = {name: dict(ms=s * 1e3, vs_torch_muon=s / torch_muon) for name, s in seconds.items()}
    return dict(matrices=len(shapes), params=sum(math.prod(s) for s in shapes), optimizers=rows)


def random_batches(case: StepCase, count: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """`count` (inputs, targets) pairs of uniform random token ids (GPT-2's, or a toy vocabulary's)."""
    generator = torch.Generator(device).manual_seed(0)
    shape = (case.batch, case.seq_len + 1)
    vocab = min(VOCAB_SIZE, case.model.vocab_size)
    tokens = [torch.randint(0, vocab, shape, device=device, generator=generator) for _ in range(count)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def memory_baseline(device: torch.device) -> int:
    """Bytes allocated now on a GPU, with the peak counter reset to it; 0 on a CPU."""
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory_gib(device: torch.device, baseline: int) -> float:
    """GPU: the most allocated since memory_baseline, above it; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_train(plan: Plan, case: StepCase, device: torch.device, clock: Clock, measured_peak: float) -> dict:
    """Time training steps as train_gpt.py runs them: forward+backward, then optimizer.step and zero_grad."""
    baseline = memory_baseline(device)
    torch.manual_seed(0)
    model = GPT(case.model).to_device(device)  # the dtypes train_gpt.py runs: bf16 tables on CUDA
    optimizer = build_optimizer(model, TrainConfig(preset=case.recipe, **PRESETS_TRAIN[case.recipe]))
    forward = torch.compile(model, dynamic=False, backend=plan.compile_backend)
    enabled = autocast_dtype(model, device) is not None  # only for an fp32 residual stream on CUDA
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
    window = None if case.window is None else torch.tensor(case.window, dtype=torch.int32, device=device)
    marks = []
    for x, y in random_batches(case, plan.warmup + plan.train_steps, device):
        start = clock.mark()
        with autocast:
            loss = forward(x, y, window=window)
        loss.backward()
        before_step = clock.mark()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append((start, before_step, clock.mark()))
    timed = marks[plan.warmup:]
    step_s = statistics.median(clock.seconds(a, c) for a, _, c in timed)
    optimizer_s = statistics.median(clock.seconds(b, c) for _, b, c in timed)
    row = train_row(case, model, device, step_s, optimizer_s, measured_peak)
    return {**row, "peak_memory_gib": peak_memory_gib(device, baseline)}


def train_row(case: StepCase, model: GPT, device: torch.device, step_s: float, optimizer_s: float,
              measured_peak: float) -> dict:
    """A training case's figures; MFU against the data-sheet peak where training.runlog knows it."""
    tokens = case.batch * case.seq_len
    tokens_per_s = tokens / step_s
    achieved = model.flops_per_token(case.seq_len, case.window) * tokens_per_s
    sheet = peak_flops(device)
    recipe_step_s = case.grad_accum * (step_s - optimizer_s) + optimizer_s
    cfg = case.model
    return dict(
        model=dict(n_layer=cfg.n_layer, dim=cfg.dim, params=sum(p.numel() for p in model.parameters())),
        batch=case.batch, seq_len=case.seq_len, window=case.window, grad_accum=case.grad_accum,
        step_ms=step_s * 1e3, optimizer_ms=optimizer_s * 1e3, optimizer_share=optimizer_s / step_s,
        optimizer_share_recipe=optimizer_s / recipe_step_s, tokens_per_s=tokens_per_s,
        achieved_tflops=achieved / 1e12, mfu=achieved / (sheet or measured_peak),
        mfu_peak="data sheet (training.runlog)" if sheet else "measured matmul",
        mfu_of_measured=achieved / measured_peak,
    )


def goals(report: dict) -> list[dict]:
    """The targets of issue 9: NS (muon set, eager, as Muon runs it), optimizer share, MFU (124M)."""
    train = report["train_124m"]
    measured = dict(
        newton_schulz_of_peak=report["newton_schulz"]["sets"]["muon"]["eager"]["of_peak"],
        optimizer_share=train["optimizer_share_recipe"],
        mfu=train["mfu"],
    )
    rows = []
    for name, value in measured.items():
        target = GOALS[name]
        met = value <= target if name == "optimizer_share" else value >= target
        rows.append(dict(goal=name, target=target, value=value, met=met))
    return rows


def run_benchmark(plan: Plan, device: torch.device, report: dict, save: Callable[[dict], None]) -> dict:
    """Fill `report` section by section, saving after each (a crash keeps what was measured) and
    noting each section's wall time, compilation included, under "wall_s"."""
    clock = Clock(device)
    report["wall_s"] = {}

    def section(name: str, measure: Callable[[], object]) -> None:
        start = time.perf_counter()
        report[name] = measure()
        report["wall_s"][name] = time.perf_counter() - start
        save(report)
        print(f"{name}: {report['wall_s'][name]:.1f} s", flush=True)

    section("ceilings", lambda: bench_ceilings(plan, device, clock))
    peak_tflops = report["ceilings"]["matmul"]["tflops"]
    section("newton_schulz", lambda: bench_newton_schulz(plan, device, clock, peak_tflops))
    section("optimizer_step", lambda: bench_optimizer_step(plan, device, clock))
    for name, case in plan.cases.items():
        section(name, partial(bench_train, plan, case, device, clock, peak_tflops * 1e12))
    report["goals"] = goals(report)
    save(report)
    return report


# ----------------------------------------------------------------------------------------------------
# Report


def markdown(report: dict) -> str:
    m = report["machine"]
    cuda = f", CUDA {m['cuda']}" if m["cuda"] else ""
    title = f"### {m['device']}, torch {m['torch']}{cuda}, {report['date'][:10]}"
    parts = [title + (" (smoke: toy sizes)" if report["smoke"] else ""), ceilings_md(report["ceilings"]),
             newton_schulz_md(report["newton_schulz"]), optimizer_md(report["optimizer_step"]),
             train_md(report), goals_md(report["goals"])]
    return "\n\n".join(parts) + "\n"


def rate(x: float) -> str:
    """Three significant digits: 798, 3.02, 0.0123 (CPU smoke figures are tiny)."""
    return f"{x:.3g}"


def ceilings_md(ceilings: dict) -> str:
    mm, cp = ceilings["matmul"], ceilings["copy"]
    dtype = mm["dtype"].removeprefix("torch.")
    return (f"Ceilings: {dtype} matmul {mm['n']}³ **{rate(mm['tflops'])} TFLOP/s**; "
            f"device copy **{rate(cp['tb_per_s'])} TB/s** (read + write).")


def newton_schulz_md(ns: dict) -> str:
    stacks_text = ", ".join("×".join(map(str, s)) for s in ns["stacks"])
    lines = [f"Newton–Schulz, {ns['steps']} steps on stacks {stacks_text} ({ns['gflop']:.1f} GFLOP), "
             f"{ns['dtype'].removeprefix('torch.')}; compiled with backend `{ns['compile_backend']}`; "
             "share of the measured matmul ceiling:",
             "",
             "| coefficients | eager ms | TFLOP/s | share | compiled ms | TFLOP/s | share |",
             "|---|---|---|---|---|---|---|"]
    for name, row in ns["sets"].items():
        e, c = row["eager"], row["compiled"]
        lines.append(f"| {name} | {e['ms']:.2f} | {rate(e['tflops'])} | {e['of_peak']:.0%} | "
                     f"{c['ms']:.2f} | {rate(c['tflops'])} | {c['of_peak']:.0%} |")
    return "\n".join(lines)


def optimizer_md(step: dict) -> str:
    lines = [f"One optimizer step over the same {step['matrices']} matrices "
             f"({step['params'] / 1e6:.1f}M parameters):",
             "", "| optimizer | ms | vs torch.optim.Muon |", "|---|---|---|"]
    for name, row in step["optimizers"].items():
        lines.append(f"| {name} | {row['ms']:.2f} | {row['vs_torch_muon']:.2f}x |")
    return "\n".join(lines)


def train_md(report: dict) -> str:
    lines = ["Training step (compiled, bf16 on a GPU as train_gpt.py runs it, random tokens); optimizer "
             "share of this one-micro-step step, and of the recipe's step with its gradient accumulation:",
             "",
             "| case | model | B × T | window | step ms | optimizer ms | share (recipe) | tokens/s | "
             "MFU | MFU of measured | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("train_124m", "train_demo"):
        r = report[name]
        model = f"{r['model']['n_layer']}L × {r['model']['dim']}, {r['model']['params'] / 1e6:.1f}M"
        lines.append(
            f"| {name} | {model} | {r['batch']} × {r['seq_len']} | {r['window'] or 'full'} | "
            f"{r['step_ms']:.1f} | {r['optimizer_ms']:.2f} | {r['optimizer_share']:.1%} "
            f"({r['optimizer_share_recipe']:.1%}, ×{r['grad_accum']}) | {r['tokens_per_s']:,.0f} | "
            f"{r['mfu']:.1%} | {r['mfu_of_measured']:.1%} | {r['peak_memory_gib']:.2f} |")
    lines.append(f"\nMFU against the {report['train_124m']['mfu_peak']} peak.")
    return "\n".join(lines)


def goals_md(rows: list[dict]) -> str:
    lines = ["| goal | target | measured | met |", "|---|---|---|---|"]
    for row in rows:
        sign = "≤" if row["goal"] == "optimizer_share" else "≥"
        lines.append(f"| {row['goal']} | {sign} {row['target']:.0%} | {row['value']:.1%} | "
                     f"{'yes' if row['met'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, seconds on a CPU; docs untouched")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results",
                        help="where the JSON and markdown go (default bench/results/)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device is visible and the full benchmark needs one; --smoke runs it on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = args.out_dir / f"gpu-{'smoke-' if args.smoke else ''}{device.type}-{stamp}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    report = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), smoke=args.smoke,
                  machine={**machine(device), "cuda": torch.version.cuda})
    run_benchmark(smoke_plan() if args.smoke else full_plan(), device, report,
                  save=lambda r: json_path.write_text(json.dumps(r, indent=2)))
    table = markdown(report)
    md_path.write_text(table)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    if not args.smoke:
        with open(REPO / "docs" / "BENCHMARKS.md", "a", encoding="utf-8") as docs:
            docs.write("\n" + table)
        print("appended the table to docs/BENCHMARKS.md")
    return report


if __name__ == "__main__":
    main()
