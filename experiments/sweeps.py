"""Learning-rate sweeps of the MLP experiments: a grid of runs per size, the best lr, and their plot.

A family is a few variants (e.g. dual vs Adam), each swept at several sizes (widths or depths);
the question is how far the best lr moves across sizes: log2(max / min) of the best lrs.
"""

import math
import time
from collections.abc import Callable

from experiments.report import (
    LOSS_CEILING,
    best_lr,
    finite_or_none,
    integer_ticks,
    log2_spread,
    plain_log_y,
    pyplot,
    save_figure,
)


def lr_sweep(train_at: Callable[[float], dict], log2_lrs) -> dict:
    """One run per lr = 2^k (train_at(lr) gives its final losses); the best lr by final train loss."""
    lrs = [2.0**k for k in log2_lrs]
    start = time.perf_counter()
    runs = [train_at(lr) for lr in lrs]
    losses = {key: [finite_or_none(r[key]) for r in runs] for key in runs[0]}
    lr, loss = best_lr(lrs, losses["train_loss"])
    return {"lrs": lrs, **losses, "best_lr": lr, "best_train_loss": loss,
            "seconds": time.perf_counter() - start}


def sweep_family(labels: dict[str, str], size_key: str, sizes: list[int],
                 sweep_at: Callable[[str, int], dict]) -> dict:
    """For each variant of `labels`, sweep_at(variant, size) at every size; the best lr's spread."""
    family = {}
    for variant, label in labels.items():
        sweeps = []
        for size in sizes:
            sweeps.append({size_key: size, **sweep_at(variant, size)})
            print(f"{variant:8s} {size_key} {size:5d}: best lr {sweeps[-1]['best_lr']}, train loss "
                  f"{sweeps[-1]['best_train_loss']} ({sweeps[-1]['seconds']:.0f}s)", flush=True)
        spread = log2_spread([s["best_lr"] for s in sweeps])
        family[variant] = {"label": label, "sweeps": sweeps, "best_lr_log2_spread": spread}
    return family


def plot_family(family: dict, size_key: str, colormap: str, suptitle: str, path, score: str = "train_loss",
                ylabel: str = "final train loss", top: float | None = LOSS_CEILING):
    """One panel per variant: the final `score` against log2 lr, a line per size, the best lr starred.

    Each sweep holds "lrs", score and "best_" + score; `top` clips the loss axis (None: no clip).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(family), figsize=(10, 4))
    for ax, result in zip(axes, family.values(), strict=True):
        sweeps = result["sweeps"]
        colors = plt.get_cmap(colormap)([0.9 * i / max(1, len(sweeps) - 1) for i in range(len(sweeps))])
        for color, s in zip(colors, sweeps, strict=True):
            points = [(math.log2(lr), loss) for lr, loss in zip(s["lrs"], s[score], strict=True)
                      if loss is not None]
            ax.plot(*zip(*points, strict=True), "o-", ms=3, color=color, label=f"{size_key} {s[size_key]}")
            if s["best_lr"] is not None:
                ax.plot(math.log2(s["best_lr"]), s["best_" + score], "*", ms=14, color=color, mec="k")
        spread = result["best_lr_log2_spread"]
        moves = "" if spread is None else f"\nbest LRs across {size_key} span a factor 2^{spread:g}"
        ax.set(xlabel="log2 learning rate", ylabel=ylabel, title=result["label"] + moves)
        integer_ticks(ax)
        plain_log_y(ax)
        ax.set_ylim(top=top)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(suptitle, fontsize=8)
    return save_figure(fig, path)
