"""Learning-rate transfer across width: dualized SGD keeps its best LR as the MLP widens; Adam does not.

    python -m experiments.lr_transfer [--quick] [--cifar DIR] [--widths 32,64,...] [--out DIR] [--figure PNG]

A 3-layer bias-free ReLU MLP (experiments/mlp.py) at each width, trained from the same seed over a
grid of learning rates (powers of 2) in two set-ups:
  dual      orthogonal init, dualized SGD (no momentum): W ← W − lr·√(d_out/d_in)·U Vᵀ;
  standard  PyTorch's init, Adam with one global lr (standard parameterization).
The score of a run is the cross-entropy on the whole training set after the last step; the best LR
of each width is the grid point with the lowest score. The claim (Bernstein & Newhouse 2025, and
spectral μP behind it): under the dual map the best LR stays put across width; under Adam in
standard parameterization it shrinks as the width grows. Data: CIFAR-10 from --cifar (python-pickle
batches, see experiments/datasets.py), else the offline teacher task, named in the output.
"""

import math
import sys
import time

from experiments.datasets import load_task
from experiments.mlp import adam, build, dual_sgd, train
from experiments.report import (
    LOSS_CEILING,
    best_lr,
    experiment_parser,
    finite_or_none,
    int_list,
    integer_ticks,
    log2_spread,
    output_paths,
    plain_log_y,
    pyplot,
    save_figure,
    torch_threads,
    write_results,
)

NAME = "lr_transfer"
SETUPS = {
    "dual": "dualized SGD (Newton–Schulz), orthogonal init",
    "standard": "Adam, standard parameterization",
}
SETTINGS = {
    # lr grids are 2^k for k in the range; each spans the best LR of every width with room both sides
    "full": dict(widths=[32, 64, 128, 256, 512, 1024], steps=100, batch_size=512, n_train=8192,
                 log2_lrs={"dual": range(-5, 2), "standard": range(-13, -2)}),
    "quick": dict(widths=[32, 256], steps=30, batch_size=256, n_train=2048,
                  log2_lrs={"dual": range(-3, 2), "standard": range(-10, -3)}),
}


def sweep(task, setup: str, width: int, settings: dict, seed: int) -> dict:
    """Train one model per LR of the grid; record each run's final losses and the best LR."""
    lrs = [2.0**k for k in settings["log2_lrs"][setup]]
    start = time.perf_counter()
    runs = []
    for lr in lrs:
        model = build(task, width, 3, setup, seed)
        optimizer = dual_sgd(model, lr) if setup == "dual" else adam(model, lr)
        runs.append(train(model, optimizer, task, settings["steps"], settings["batch_size"], seed))
    train_loss = [finite_or_none(r["train_loss"]) for r in runs]
    lr, loss = best_lr(lrs, train_loss)
    return {
        "width": width,
        "lrs": lrs,
        "train_loss": train_loss,
        "test_loss": [finite_or_none(r["test_loss"]) for r in runs],
        "test_accuracy": [finite_or_none(r["test_accuracy"]) for r in runs],
        "best_lr": lr,
        "best_train_loss": loss,
        "seconds": time.perf_counter() - start,
    }


def run(task, settings: dict, seed: int) -> dict:
    """Every set-up at every width; per set-up, how many factors of 2 the best LR moves across width."""
    setups = {}
    for setup, label in SETUPS.items():
        sweeps = []
        for width in settings["widths"]:
            sweeps.append(sweep(task, setup, width, settings, seed))
            print(f"{setup:8s} width {width:5d}: best lr {sweeps[-1]['best_lr']}, train loss "
                  f"{sweeps[-1]['best_train_loss']} ({sweeps[-1]['seconds']:.0f}s)", flush=True)
        spread = log2_spread([s["best_lr"] for s in sweeps])
        setups[setup] = {"label": label, "sweeps": sweeps, "best_lr_log2_spread": spread}
    return setups


def plot(results: dict, path):
    """One panel per set-up: final train loss against LR, a line per width, the best LR starred."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results["setups"]), figsize=(10, 4))
    for ax, result in zip(axes, results["setups"].values(), strict=True):
        sweeps = result["sweeps"]
        colors = plt.cm.viridis([i / max(1, len(sweeps) - 1) for i in range(len(sweeps))])
        for color, s in zip(colors, sweeps, strict=True):
            points = [(math.log2(lr), loss) for lr, loss in zip(s["lrs"], s["train_loss"], strict=True)
                      if loss is not None]
            ax.plot(*zip(*points, strict=True), "o-", ms=3, color=color, label=f"width {s['width']}")
            if s["best_lr"] is not None:
                ax.plot(math.log2(s["best_lr"]), s["best_train_loss"], "*", ms=14, color=color, mec="k")
        spread = result["best_lr_log2_spread"]
        moves = "" if spread is None else f"\nbest LRs across width span a factor 2^{spread:g}"
        ax.set(xlabel="log2 learning rate", ylabel="final train loss", title=result["label"] + moves)
        integer_ticks(ax)
        plain_log_y(ax)
        ax.set_ylim(top=LOSS_CEILING)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"LR transfer across width, 3-layer MLP, {results['task']}", fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = experiment_parser(__doc__)
    parser.add_argument("--cifar", default=None, help="folder of CIFAR-10 python-pickle batches")
    parser.add_argument("--widths", type=int_list, default=None, help="comma-separated widths")
    args = parser.parse_args(argv)
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    settings["widths"] = args.widths or settings["widths"]
    json_path, png_path = output_paths(args, NAME)
    with torch_threads(args.threads):
        task = load_task(args.cifar, settings["n_train"])
        print(f"data: {task.name}")
        setups = run(task, settings, args.seed)
    results = {
        "experiment": NAME,
        "mode": "quick" if args.quick else "full",
        "task": task.name,
        "seed": args.seed,
        "settings": {**settings, "log2_lrs": {k: list(v) for k, v in settings["log2_lrs"].items()}},
        "setups": setups,
    }
    write_results(json_path, NAME, argv, results)
    plot(results, png_path)
    print(f"results {json_path}, figure {png_path}")
    return results


if __name__ == "__main__":
    main()
