"""Learning-rate transfer across depth, with and without the modular norm's per-layer step shares.

    python -m experiments.depth [--quick] [--cifar DIR] [--depths 3,6,12,24] [--out DIR] [--figure PNG]

The bias-free ReLU MLP of experiments/mlp.py at one width and several depths L (number of Linear
layers), orthogonal init, dualized SGD (no momentum), over a grid of learning rates (powers of 2):
  plain    every layer steps by lr in its RMS→RMS norm, so the whole step grows with L;
  modular  layer l steps by lr·s_l with s_l its share from optim.modular: masses 1 per Linear,
           ReLU sensitivity 1, so s_l = 1/L and the step is lr in the modular norm at every depth.
The score is the train-set cross-entropy after the last step; the claim (Large et al. 2024) is that
with the shares the best lr no longer depends on depth, while without them it falls about as 1/L.
"""

import math
import sys
import time

from experiments.datasets import load_task
from experiments.mlp import build, dual_sgd, train
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

NAME = "depth"
VARIANTS = {
    "plain": "dualized SGD, every layer lr",
    "modular": "dualized SGD, layer l lr·(1/L) (modular-norm shares)",
}
SETTINGS = {
    # depths off the powers of 2, so a modular run's per-layer lr lr/L is never a plain run's lr
    "full": dict(width=128, depths=[3, 6, 12, 24], steps=100, batch_size=512, n_train=8192,
                 log2_lrs=range(-6, 4)),
    "quick": dict(width=32, depths=[3, 12], steps=30, batch_size=128, n_train=2048, log2_lrs=range(-5, 3)),
}


def sweep(task, depth: int, modular: bool, settings: dict, seed: int) -> dict:
    """One dualized-SGD run per LR of the grid at this depth; each run's final losses and the best LR."""
    lrs = [2.0**k for k in settings["log2_lrs"]]
    start = time.perf_counter()
    runs = []
    for lr in lrs:
        model = build(task, settings["width"], depth, "dual", seed)
        optimizer = dual_sgd(model, lr, modular=modular)
        runs.append(train(model, optimizer, task, settings["steps"], settings["batch_size"], seed))
    train_loss = [finite_or_none(r["train_loss"]) for r in runs]
    lr, loss = best_lr(lrs, train_loss)
    return {"depth": depth, "lrs": lrs, "train_loss": train_loss,
            "test_loss": [finite_or_none(r["test_loss"]) for r in runs],
            "best_lr": lr, "best_train_loss": loss, "seconds": time.perf_counter() - start}


def run(task, settings: dict, seed: int) -> dict:
    variants = {}
    for variant, label in VARIANTS.items():
        sweeps = []
        for depth in settings["depths"]:
            sweeps.append(sweep(task, depth, variant == "modular", settings, seed))
            print(f"{variant:8s} depth {depth:3d}: best lr {sweeps[-1]['best_lr']}, train loss "
                  f"{sweeps[-1]['best_train_loss']} ({sweeps[-1]['seconds']:.0f}s)", flush=True)
        spread = log2_spread([s["best_lr"] for s in sweeps])
        variants[variant] = {"label": label, "sweeps": sweeps, "best_lr_log2_spread": spread}
    return variants


def plot(results: dict, path):
    """One panel per variant: final train loss against LR, a line per depth, the best LR starred."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results["variants"]), figsize=(10, 4))
    for ax, result in zip(axes, results["variants"].values(), strict=True):
        sweeps = result["sweeps"]
        colors = plt.cm.plasma([0.85 * i / max(1, len(sweeps) - 1) for i in range(len(sweeps))])
        for color, s in zip(colors, sweeps, strict=True):
            points = [(math.log2(lr), loss) for lr, loss in zip(s["lrs"], s["train_loss"], strict=True)
                      if loss is not None]
            ax.plot(*zip(*points, strict=True), "o-", ms=3, color=color, label=f"depth {s['depth']}")
            if s["best_lr"] is not None:
                ax.plot(math.log2(s["best_lr"]), s["best_train_loss"], "*", ms=14, color=color, mec="k")
        spread = result["best_lr_log2_spread"]
        moves = "" if spread is None else f"\nbest LRs across depth span a factor 2^{spread:g}"
        ax.set(xlabel="log2 learning rate", ylabel="final train loss",
               title=result["label"] + moves)
        integer_ticks(ax)
        plain_log_y(ax)
        ax.set_ylim(top=LOSS_CEILING)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"LR transfer across depth, width {results['settings']['width']} MLP, {results['task']}",
                 fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = experiment_parser(__doc__)
    parser.add_argument("--cifar", default=None, help="folder of CIFAR-10 python-pickle batches")
    parser.add_argument("--depths", type=int_list, default=None, help="comma-separated depths (>= 2)")
    args = parser.parse_args(argv)
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    settings["depths"] = args.depths or settings["depths"]
    if min(settings["depths"]) < 2:
        parser.error(f"--depths: each must be >= 2 (an input and an output layer), got {settings['depths']}")
    json_path, png_path = output_paths(args, NAME)
    with torch_threads(args.threads):
        task = load_task(args.cifar, settings["n_train"])
        print(f"data: {task.name}")
        variants = run(task, settings, args.seed)
    results = {"experiment": NAME, "mode": "quick" if args.quick else "full", "task": task.name,
               "seed": args.seed, "settings": {**settings, "log2_lrs": list(settings["log2_lrs"])},
               "variants": variants}
    write_results(json_path, NAME, argv, results)
    plot(results, png_path)
    print(f"results {json_path}, figure {png_path}")
    return results


if __name__ == "__main__":
    main()
