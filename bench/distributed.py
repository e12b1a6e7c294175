"""Sharding cost: per-rank Newton–Schulz work, optimizer state and time, and bytes sent per step, against W.

    python -m bench.distributed [--world-sizes 1 2 3 4] [--layers 4] [--dim 256] [--vocab 4096]
                                [--steps 5] [--json PATH]

W gloo processes on the CPU, one thread each, step with optim.Muon a small GPT's parameters: the hidden
matrices of `layers` blocks at width `dim` (bench.optim.gpt_hidden_shapes: per layer 4 dim×dim,
4dim×dim, dim×4dim; kind hidden) and, as the speedrun's Adam side, a token embedding and a head of
`vocab`×`dim` and 2 gains a block (kind adam). Gradients are set directly, so step() does all
communication (nothing overlaps a backward here). After a warm-up step (which also agrees the launch
order), per W:

  newton_schulz   matrices and GFLOP per rank; wall time per rank (the slowest rank, median step)
  step            wall time of the whole step (the slowest rank, median step)
  state           optimizer-state bytes per rank (the largest), and as a multiple of 1/W of all ranks' sum
  bytes           sent per rank per step, measured on the loopback interface (/proc/net/dev counts
                  the whole machine, so the least over the steps), and predicted from the step's
                  collectives (optim.step_collectives; optim/zero.py gives the
                  formulas): (W−1) chunks per reduce-scatter and all-gather, 2(W−1)/W of each flags
                  all-reduce (none here: every parameter has a gradient, Muon's default). Gloo
                  builds a reduce-scatter from an all-reduce of the whole input, which sends twice a
                  ring reduce-scatter's bytes: predicted both ways
  all_reduce      the same gradients all-reduced instead, as a replicated step (DDP, or this
                  optimizer before ZeRO-1) sends them: measured, and predicted 2(W−1)/W·(elements)·4

With more processes than cores (W > 2 on 2 cores) ranks share cores, so per-rank wall times include
waiting for a core; the GFLOP column is the work itself. Prints a table and writes JSON (default
bench/results/distributed-cpu-<time>.json).
"""

import argparse
import datetime
import importlib
import json
import math
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.optim import gpt_hidden_shapes, machine
from optim import (
    ALL_REDUCE,
    REDUCE_SCATTER,
    Collective,
    Muon,
    default_dtype,
    newton_schulz_flops,
    orthogonalize,
    step_collectives,
)

ELEMENT = 4  # bytes: float32


def loopback_bytes_sent() -> int | None:
    """Bytes the loopback interface has sent since boot (every process's), or None off Linux."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    return None


def adam_shapes(layers: int, dim: int, vocab: int) -> list[tuple[int, ...]]:
    """The Adam side: token embedding, head, 2 gains a block."""
    return [(vocab, dim), (vocab, dim)] + [(dim,)] * (2 * layers)


def problem_shapes(layers: int, dim: int, vocab: int) -> list[dict]:
    """problem's param groups as meta tensors: its shapes and kinds only."""
    shapes = [gpt_hidden_shapes(layers, dim), adam_shapes(layers, dim, vocab)]
    return [dict(params=[torch.empty(shape, device="meta") for shape in group], kind=kind)
            for group, kind in zip(shapes, ("hidden", "adam"), strict=True)]


def problem(layers: int, dim: int, vocab: int) -> list[dict]:
    """Muon param groups, seeded alike on every rank: the blocks' hidden matrices, and the Adam side."""
    gen = torch.Generator().manual_seed(0)
    shapes = gpt_hidden_shapes(layers, dim)
    hidden = [torch.randn(shape, generator=gen) / math.sqrt(shape[1]) for shape in shapes]
    adam = [torch.randn(shape, generator=gen) for shape in adam_shapes(layers, dim, vocab)]
    return [dict(params=hidden, kind="hidden"), dict(params=adam, kind="adam")]


def set_gradients(groups: list[dict], step: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=gen)


def predicted_bytes(layers: int, dim: int, vocab: int, world_size: int) -> dict:
    """Bytes a rank sends per step (module docstring), from the step's own list of collectives."""
    W, groups = world_size, problem_shapes(layers, dim, vocab)
    collectives = step_collectives(groups, W)
    matrices, adam = ([c for c in collectives if c.group == g] for g in range(2))
    elements = sum(p.numel() for group in groups for p in group["params"])
    stacks = Counter(gpt_hidden_shapes(layers, dim))
    return dict(
        matrices=sum(sent(c, W) for c in matrices),
        adam=sum(sent(c, W) for c in adam),
        sharded=sum(sent(c, W) for c in collectives),
        sharded_gloo=sum(sent(c, W, gloo=True) for c in collectives),
        all_reduce=ELEMENT * 2 * (W - 1) / W * elements,
        padded_matrices=sum(W * math.ceil(n / W) for n in stacks.values()),
    )


def sent(collective: Collective, world_size: int, gloo: bool = False) -> float:
    """Bytes a rank sends for one collective by ring algorithms: (W−1) chunks for a reduce-scatter or an
    all-gather, 2(W−1)/W of the buffer for an all-reduce; gloo's reduce-scatter is an all-reduce of its
    W rows, 2(W−1) chunks."""
    W = world_size
    if collective.op == ALL_REDUCE:
        return 2 * (W - 1) / W * collective.bytes
    if collective.op == REDUCE_SCATTER and gloo:
        return 2 * (W - 1) * collective.bytes
    return (W - 1) * collective.bytes


def rank_worker(rank: int, world_size: int, args: argparse.Namespace, tmp: Path) -> None:
    """One rank's measurements, written to tmp/rank<r>.json."""
    torch.set_num_threads(1)
    importlib.import_module("torch._dynamo")  # before the group: see optim/distributed.py
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank,
                                world_size=world_size)
    groups = problem(args.layers, args.dim, args.vocab)
    opt = Muon(groups, lr=0.02, momentum=0.95)
    ns_seconds, ns_shapes = [0.0], []

    def timed_orthogonalize(G, **kwargs):
        start = time.perf_counter()
        out = orthogonalize(G, **kwargs)
        ns_seconds[0] += time.perf_counter() - start
        ns_shapes.append(tuple(G.shape))
        return out

    steps = []
    # Muon's kinds call orthogonalize by this name (optim/kinds.py): timed there, inside the step.
    with mock.patch("optim.kinds.orthogonalize", timed_orthogonalize):
        for step in range(args.steps + 1):  # step 0: warm-up
            set_gradients(groups, step, rank)
            ns_seconds[0], ns_shapes[:] = 0.0, []
            steps.append(measure(lambda: opt.step(), world_size) | dict(ns_s=ns_seconds[0]))
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
    result = dict(steps=steps[1:], ns_shapes=ns_shapes, state_bytes=state)
    if world_size > 1:
        flat = torch.cat([p.grad.reshape(-1) for g in groups for p in g["params"]])
        result["all_reduce"] = [measure(lambda: dist.all_reduce(flat), world_size) for _ in range(args.steps)]
        dist.destroy_process_group()
    (tmp / f"rank{rank}.json").write_text(json.dumps(result))


def measure(run, world_size: int) -> dict:
    """Seconds of run() on this rank and loopback bytes sent meanwhile by all ranks, per rank.

    Barriers around it start the ranks together and keep other ranks' traffic out of rank 0's reading.
    """
    if world_size == 1:
        start = time.perf_counter()
        run()
        return dict(seconds=time.perf_counter() - start, bytes=0)
    dist.barrier()
    before = loopback_bytes_sent()
    dist.barrier()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    dist.barrier()
    after = loopback_bytes_sent()
    sent = None if before is None else (after - before) / world_size
    return dict(seconds=seconds, bytes=sent)


def run_world(world_size: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_worker, args=(world_size, args, Path(tmp)), nprocs=world_size)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world_size)]
    predicted = predicted_bytes(args.layers, args.dim, args.vocab, world_size)
    report = dict(world_size=world_size, predicted=predicted)
    report["ns_matrices"] = [sum(s[0] for s in r["ns_shapes"]) for r in ranks]
    report["ns_gflop"] = [sum(newton_schulz_flops(s) for s in r["ns_shapes"]) / 1e9 for r in ranks]
    report["ns_ms"] = [1e3 * statistics.median(s["ns_s"] for s in r["steps"]) for r in ranks]
    report["step_ms"] = [1e3 * statistics.median(s["seconds"] for s in r["steps"]) for r in ranks]
    report["state_bytes"] = [r["state_bytes"] for r in ranks]
    # Rank 0 read the counter; other processes on the machine can only add to it.
    report["bytes"] = min(s["bytes"] for s in ranks[0]["steps"]) if world_size > 1 else 0
    if world_size > 1:
        report["all_reduce_bytes"] = min(s["bytes"] for s in ranks[0]["all_reduce"])
        report["all_reduce_ms"] = 1e3 * statistics.median(s["seconds"] for s in ranks[0]["all_reduce"])
    return report


def print_report(report: dict) -> None:
    print(f"\n{report['machine']}\n{report['problem']}")
    header = (f"{'W':>2} {'NS mat/rank':>11} {'NS GFLOP/rank':>13} {'NS ms':>6} {'step ms':>8} "
              f"{'state MB/rank':>13} {'MB/rank sent':>13} {'pred. gloo':>10} {'pred. ring':>10} "
              f"{'all-reduce MB meas./ring':>25}")
    print(header)
    for w in report["world_sizes"]:
        gloo, ring = w["predicted"]["sharded_gloo"] / 1e6, w["predicted"]["sharded"] / 1e6
        all_reduce = (f"{w['all_reduce_bytes'] / 1e6:.2f} / {w['predicted']['all_reduce'] / 1e6:.2f}"
                      if w["world_size"] > 1 else "-")
        state = max(w["state_bytes"])  # the largest share, as a multiple of an even 1/W of the sum
        share = f"({state * w['world_size'] / sum(w['state_bytes']):.2f}/W)"
        print(f"{w['world_size']:>2} {max(w['ns_matrices']):>11} {max(w['ns_gflop']):>13.2f} "
              f"{max(w['ns_ms']):>6.0f} {max(w['step_ms']):>8.0f} {state / 1e6:>6.2f} {share:>8} "
              f"{w['bytes'] / 1e6:>13.2f} {gloo:>10.2f} {ring:>10.2f} {all_reduce:>25}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096, help="rows of the embedding and the head (Adam)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--json", type=Path, help="where to write results (bench/results/distributed-*.json)")
    args = parser.parse_args(argv)
    shapes = Counter(gpt_hidden_shapes(args.layers, args.dim))
    report = dict(
        date=datetime.date.today().isoformat(),
        machine=machine(torch.device("cpu")) | dict(threads_per_rank=1),
        ns_dtype=str(default_dtype(torch.device("cpu"))),
        problem=(f"{args.layers} layers at dim {args.dim}: hidden stacks {dict(shapes)}; Adam: embedding and "
                 f"head {args.vocab}x{args.dim}, {2 * args.layers} gains"),
        world_sizes=[run_world(w, args) for w in args.world_sizes],
    )
    print_report(report)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.json or Path("bench/results") / f"distributed-cpu-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
