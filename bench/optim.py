"""Optimizer cost: Newton–Schulz per coefficient set, one step vs torch.optim.Muon and AdamW, NS vs SVD.

    python -m bench.optim [--device cpu|cuda] [--size quick|full] [--repeats N] [--json PATH]

All on the hidden matrices of a GPT block stack (per layer q, k, v, o: dim×dim; MLP in 4dim×dim,
out dim×4dim; the 124M model is 12 layers at dim 768):
  newton_schulz  orthogonalize() on the same-shape stacks Muon builds, 5 steps, per coefficient set,
                 eager, in the default dtype (optim.default_dtype: bf16 on CUDA and on CPUs with bf16 dot
                 products, float32 elsewhere); TFLOP/s against a measured matmul peak in that dtype
  step           one optimizer step over the same parameters: optim.Muon (default dtype; on a CPU also
                 the other dtype), torch.optim.Muon, AdamW, each with its ratio to torch.optim.Muon
  svd            one matrix: orthogonalize() vs U Vᵀ from torch.linalg.svd (float32)
The report records the default dtype chosen and the CPU's bf16 flags (avx512_bf16, amx_bf16).
Sizes: "full" is the 124M model (the default on CUDA); "quick" (the default on CPU, ~1-2 minutes)
times Newton–Schulz on one layer of 124M shapes and steps a 2-layer dim-256 stack, because
torch.optim.Muon always iterates in bf16, which a CPU without bf16 matmul units runs ~100x
slower than float32. Each figure follows a warm-up; GPU times are CUDA-event medians, CPU times the
best of the repeats (see time_runs). Prints a table and writes JSON (default
bench/results/optim-<device>-<time>.json).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from optim import COEFFICIENTS, Muon, default_dtype, newton_schulz_flops, orthogonalize

SIZES = {
    "full": dict(ns_layers=12, ns_dim=768, step_layers=12, step_dim=768, repeats=10),
    "quick": dict(ns_layers=1, ns_dim=768, step_layers=2, step_dim=256, repeats=5),
}


def gpt_hidden_shapes(layers: int, dim: int) -> list[tuple[int, int]]:
    """The hidden matrices of `layers` GPT blocks in nn.Linear's (d_out, d_in) layout."""
    return ([(dim, dim)] * 4 + [(4 * dim, dim), (dim, 4 * dim)]) * layers


def seconds_one(run: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    run()
    end_event.record()
    torch.cuda.synchronize()
    return start_event.elapsed_time(end_event) / 1e3


def time_runs(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds per run: the median on CUDA; on the CPU the best, since other processes sharing
    the CPU only ever add time. Runs take turns within each repeat, so such load hits all alike."""
    for run in runs.values():
        run()  # warm-up: allocator, kernels, lazy optimizer state
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(seconds_one(run, device))
    summary = statistics.median if device.type == "cuda" else min
    return {name: summary(ts) for name, ts in times.items()}


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Measured FLOP/s of one large square matmul (8192 on CUDA, 2048 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / time_runs({"matmul": lambda: a @ b}, device, repeats)["matmul"]


def stacks(shapes: list[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
    """Random matrices stacked by shape, as Muon stacks a param group's same-shape updates."""
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    return [torch.randn(count, *shape, device=device) for shape, count in counts.items()]


def orthogonalize_each(mats: list[torch.Tensor], coefficients: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Eager Newton–Schulz on each stack (bench.gpu wraps this in torch.compile for the compiled figure)."""
    return [orthogonalize(m, 5, coefficients, dtype, compile=False) for m in mats]


def svd_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh


def bench_newton_schulz(device, dtype, layers, dim, repeats) -> dict:
    mats = stacks(gpt_hidden_shapes(layers, dim), device)
    flops = sum(newton_schulz_flops(m.shape, 5) for m in mats)
    peak = matmul_peak(device, dtype, repeats)
    runs = {name: partial(orthogonalize_each, mats, name, dtype) for name in COEFFICIENTS}
    rows = {
        name: dict(ms=seconds * 1e3, tflops=flops / seconds / 1e12, of_peak=flops / seconds / peak)
        for name, seconds in time_runs(runs, device, repeats).items()
    }
    return dict(
        layers=layers, dim=dim, dtype=str(dtype), gflop=flops / 1e9, peak_tflops=peak / 1e12, sets=rows
    )


def bench_step(device, layers, dim, repeats) -> dict:
    shapes = gpt_hidden_shapes(layers, dim)
    gen = torch.Generator(device).manual_seed(0)
    init = [torch.randn(s, device=device, generator=gen) for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) for s in shapes]

    def params():
        copies = [p.clone() for p in init]
        for p, g in zip(copies, grads, strict=True):
            p.grad = g
        return copies

    cuda = device.type == "cuda"
    optimizers = {"optim.Muon": lambda ps: Muon(ps)}
    if not cuda:  # on CUDA our default already iterates in bf16, as torch's does; on a CPU, the other one
        other = torch.float32 if default_dtype(device) == torch.bfloat16 else torch.bfloat16
        name = f"optim.Muon ({str(other).removeprefix('torch.')} NS)"
        optimizers[name] = lambda ps: Muon(ps, ns_dtype=other)
    optimizers["torch.optim.Muon"] = lambda ps: torch.optim.Muon(ps, adjust_lr_fn="original")
    optimizers["torch.optim.AdamW"] = lambda ps: torch.optim.AdamW(ps, fused=cuda, foreach=not cuda)
    seconds = time_runs({name: make(params()).step for name, make in optimizers.items()}, device, repeats)
    rows = {
        name: dict(ms=s * 1e3, vs_torch_muon=s / seconds["torch.optim.Muon"]) for name, s in seconds.items()
    }
    return dict(
        layers=layers, dim=dim, matrices=len(shapes), params=sum(p.numel() for p in init), optimizers=rows
    )


def bench_svd(device, dim, repeats) -> dict:
    rows = {}
    for shape in [(dim, dim), (4 * dim, dim)]:
        G = torch.randn(shape, device=device)
        t = time_runs({"ns": partial(orthogonalize, G), "svd": partial(svd_polar, G)}, device, repeats)
        rows[f"{shape[0]}x{shape[1]}"] = dict(
            newton_schulz_ms=t["ns"] * 1e3, svd_ms=t["svd"] * 1e3, speedup=t["svd"] / t["ns"]
        )
    return rows


def machine(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), cpus=os.cpu_count())
    info["threads"] = torch.get_num_threads()
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    info["bf16_cpu_flags"] = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in cpu_flags()]
    return info


def cpu_info(key: str) -> str:
    """The first /proc/cpuinfo value of `key`, or "" off Linux."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    values = [line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key]
    return values[0] if values else ""


def cpu_name() -> str:
    return cpu_info("model name") or platform.machine()


def cpu_flags() -> set[str]:
    return set(cpu_info("flags").split())


def print_report(report: dict) -> None:
    ns = report["newton_schulz"]
    print(f"\n{report['machine']}")
    print(
        f"\nNewton–Schulz, 5 steps, {ns['layers']} layer(s) at dim {ns['dim']} ({ns['gflop']:.1f} GFLOP), "
        f"{ns['dtype']}; matmul peak {ns['peak_tflops']:.3f} TFLOP/s"
    )
    for name, row in ns["sets"].items():
        print(
            f"  {name:24s} {row['ms']:10.1f} ms  {row['tflops']:8.3f} TFLOP/s  {row['of_peak']:6.1%} of peak"
        )
    print(
        "  (4m²n + 2m³ FLOPs per step for every set; cubic's c = 0 lets BLAS skip A², so its rate overstates)"
    )
    step = report["step"]
    print(f"\nOptimizer step, {step['matrices']} matrices ({step['layers']} layers at dim {step['dim']}); "
          f"default Newton–Schulz dtype {report['ns_default_dtype']} "
          f"(bf16 CPU flags: {report['machine']['bf16_cpu_flags'] or 'none'})")
    for name, row in step["optimizers"].items():
        print(f"  {name:24s} {row['ms']:10.1f} ms  {row['vs_torch_muon']:8.3f}x torch.optim.Muon")
    print(f"\nOne float32 matrix: Newton–Schulz ({report['ns_default_dtype']}) vs U Vᵀ by torch.linalg.svd")
    for shape, row in report["svd"].items():
        ns_ms, svd_ms = row["newton_schulz_ms"], row["svd_ms"]
        print(f"  {shape:24s} NS {ns_ms:8.1f} ms  SVD {svd_ms:8.1f} ms  {row['speedup']:6.1f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.optim", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--size", choices=sorted(SIZES), help="full (124M) or quick; default full on cuda")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement, after one warm-up")
    parser.add_argument("--json", type=Path, help="where to write results (bench/results/optim-*.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible; run with --device cpu")
    device = torch.device(args.device)
    size_name = args.size or ("full" if device.type == "cuda" else "quick")
    size = SIZES[size_name]
    repeats = args.repeats or size["repeats"]
    dtype = default_dtype(device)  # orthogonalize()'s and Muon's default
    report = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        size=size_name,
        repeats=repeats,
        machine=machine(device),
        ns_default_dtype=str(dtype),
        newton_schulz=bench_newton_schulz(device, dtype, size["ns_layers"], size["ns_dim"], repeats),
        step=bench_step(device, size["step_layers"], size["step_dim"], repeats),
        svd=bench_svd(device, size["ns_dim"], repeats),
    )
    print_report(report)
    path = args.json or Path("bench/results") / f"optim-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
