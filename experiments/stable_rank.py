"""Stable rank of the hidden layer's update, and how far the update moves the weights (weight erasure).

    python -m experiments.stable_rank [--quick] [--cifar DIR] [--widths 32,64,...] [--out DIR] [--figure PNG]

Stable rank sr(A) = ‖A‖_F² / ‖A‖₂², between 1 (one direction) and rank(A) (all singular values
equal). For the w×w hidden layer of the 3-layer MLP (experiments/mlp.py) with batch B, the gradient
G = U Σ Vᵀ has rank ≤ min(w, B) but its singular values fall off fast, so sr(G) is small; its
polar factor U Vᵀ has every nonzero singular value 1, so sr = rank(G); Newton–Schulz (5 steps of
the speedrun quintic, float32) approximates U Vᵀ but leaves singular values below ~1e-3·‖G‖_F short
of 1. The exact reference is the float64 SVD with σ < 1e-10·σ_max dropped (optim.polar_reference);
without that threshold round-off directions are inflated to 1, shown as "polar, no threshold".
The model runs in float64 so G has its exact rank.

Weight erasure (Bernstein & Newhouse 2025): a step of fixed spectral size moves W by a relative
Frobenius amount ‖ΔW‖_F/‖W‖_F that grows with the step's stable rank. After T steps of size lr in
the RMS→RMS norm, from the orthogonal init, we compare ‖W_T − W_0‖_F/‖W_0‖_F for the dual step
(lr·√(d_out/d_in)·U Vᵀ, Newton–Schulz) and for the raw gradient rescaled to the same spectral size
(lr·√(d_out/d_in)·G/‖G‖₂): only the direction's stable rank differs. The measured update stable
ranks are averaged over the dual run's steps 0, every, 2·every, ….
"""

import math
import sys
import time

import torch
import torch.nn.functional as F

from experiments.datasets import add_task_flags, load_task
from experiments.mlp import build, dual_sgd, linear_layers
from experiments.report import (
    experiment_parser,
    finish,
    log_ticks,
    mode_settings,
    output_paths,
    plain_log_y,
    pyplot,
    save_figure,
    torch_threads,
)
from optim import orthogonalize, polar_reference

NAME = "stable_rank"
UPDATES = {
    "gradient": "raw gradient G",
    "newton_schulz": "Newton–Schulz(G), 5 steps, float32",
    "polar": "exact polar U Vᵀ (σ < 1e-10·σ_max dropped)",
    "polar_no_threshold": "polar, no threshold (the pitfall)",
}
SETTINGS = {
    "full": dict(widths=[32, 64, 128, 256, 512, 1024], batch_size=512, steps=20, measure_every=5,
                 lr=2.0**-4, n_train=8192),
    "quick": dict(widths=[16, 64], batch_size=32, steps=4, measure_every=2, lr=2.0**-4, n_train=1024),
}


def stable_rank(A: torch.Tensor) -> float:
    """‖A‖_F² / ‖A‖₂² (float64 SVD); 0 for A = 0."""
    sigma = torch.linalg.svdvals(A.double())
    return (sigma.square().sum() / sigma[0].square()).item() if sigma[0] > 0 else 0.0


def update_stable_ranks(G: torch.Tensor) -> dict[str, float]:
    """sr of each candidate update built from the gradient G of one layer."""
    return {
        "gradient": stable_rank(G),
        "newton_schulz": stable_rank(orthogonalize(G, dtype=torch.float32)),
        "polar": stable_rank(polar_reference(G)),
        "polar_no_threshold": stable_rank(polar_reference(G, rtol=0.0)),
    }


@torch.no_grad()
def normalized_gradient_step(model: torch.nn.Module, lr: float) -> None:
    """W ← W − lr·√(d_out/d_in)·G/‖G‖₂: the raw gradient's direction at the dual step's spectral size."""
    for layer in linear_layers(model):
        G = layer.weight.grad
        d_out, d_in = G.shape
        norm = torch.linalg.matrix_norm(G, ord=2)
        if norm > 0:
            layer.weight.sub_(G, alpha=lr * math.sqrt(d_out / d_in) / norm.item())


def run_width(task, width: int, settings: dict, seed: int, rule: str) -> dict:
    """T steps of `rule` ("dual" or "normalized_gradient") at constant lr; the hidden layer's movement.

    The dual run also records the stable ranks of the candidate updates at every measure_every step.
    """
    model = build(task, width, 3, "dual", seed).double()
    hidden = linear_layers(model)[1].weight
    W0 = hidden.detach().clone()
    optimizer = dual_sgd(model, settings["lr"]) if rule == "dual" else None
    gen = torch.Generator().manual_seed(seed)
    ranks = []
    for step in range(settings["steps"]):
        batch = torch.randint(len(task.y_train), (settings["batch_size"],), generator=gen)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(task.x_train[batch].double()), task.y_train[batch]).backward()
        if rule == "dual" and step % settings["measure_every"] == 0:
            ranks.append(update_stable_ranks(hidden.grad))
        if optimizer is not None:
            optimizer.step()
        else:
            normalized_gradient_step(model, settings["lr"])
    moved = hidden.detach() - W0
    spectral = torch.linalg.matrix_norm
    result = {
        "relative_frobenius_change": (moved.norm() / W0.norm()).item(),
        "relative_spectral_change": (spectral(moved, 2) / spectral(W0, 2)).item(),
    }
    if ranks:
        result["stable_rank"] = {k: sum(r[k] for r in ranks) / len(ranks) for k in UPDATES}
    return result


def run(task, settings: dict, seed: int) -> list[dict]:
    rows = []
    for width in settings["widths"]:
        start = time.perf_counter()
        dual = run_width(task, width, settings, seed, "dual")
        normalized = run_width(task, width, settings, seed, "normalized_gradient")
        rows.append({"width": width, "stable_rank": dual.pop("stable_rank"), "dual": dual,
                     "normalized_gradient": normalized, "seconds": time.perf_counter() - start})
        sr = rows[-1]["stable_rank"]
        print(f"width {width:5d}: sr gradient {sr['gradient']:.2f}, NS {sr['newton_schulz']:.1f}, polar "
              f"{sr['polar']:.1f}, polar no threshold {sr['polar_no_threshold']:.1f}; relative Frobenius "
              f"change dual {dual['relative_frobenius_change']:.3f}, normalized gradient "
              f"{normalized['relative_frobenius_change']:.3f} ({rows[-1]['seconds']:.0f}s)", flush=True)
    return rows


def plot(results: dict, path):
    """Left: mean stable rank of each update against width. Right: relative movement of W after T steps."""
    plt = pyplot()
    rows, settings = results["widths"], results["settings"]
    widths = [r["width"] for r in rows]
    fig, (ranks, moved) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in UPDATES.items():
        ranks.plot(widths, [r["stable_rank"][key] for r in rows], "o-", ms=4, label=label)
    ranks.plot(widths, [min(w, settings["batch_size"]) for w in widths], "k:", label="min(width, batch)")
    ranks.set(xlabel="width w (hidden layer w×w)", ylabel="stable rank",
              title=f"stable rank of the w×w update, batch {settings['batch_size']}")
    for rule, label in (("dual", "dual step (Newton–Schulz)"),
                        ("normalized_gradient", "raw gradient at the same spectral size")):
        moved.plot(widths, [r[rule]["relative_frobenius_change"] for r in rows], "o-", ms=4,
                   label=f"{label}: Frobenius")
        moved.plot(widths, [r[rule]["relative_spectral_change"] for r in rows], "x--", ms=4,
                   label=f"{label}: spectral")
    moved.set(xlabel="width w", ylabel="‖W_T − W_0‖ / ‖W_0‖",
              title=f"movement of W after {settings['steps']} steps of lr {settings['lr']:g}")
    for ax in (ranks, moved):
        log_ticks(ax, widths)
        plain_log_y(ax)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    # room below the lowest line for the legend
    moved.set_ylim(bottom=min(r["normalized_gradient"]["relative_frobenius_change"] for r in rows) / 4)
    fig.suptitle(f"3-layer MLP, {results['task']}", fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = add_task_flags(experiment_parser(__doc__), "widths", "comma-separated widths")
    args = parser.parse_args(argv)
    settings = mode_settings(args, SETTINGS, widths=args.widths)
    paths = output_paths(args, NAME)
    with torch_threads(args.threads):
        task = load_task(args.cifar, settings["n_train"])
        rows = run(task, settings, args.seed)
    results = {"task": task.name, "settings": settings, "updates": UPDATES, "widths": rows}
    return finish(NAME, argv, args, paths, results, plot)


if __name__ == "__main__":
    main()
