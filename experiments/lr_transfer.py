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

import sys

from experiments.datasets import add_task_flags, load_task
from experiments.mlp import adam, build, dual_sgd, train
from experiments.report import experiment_parser, finish, mode_settings, output_paths, torch_threads
from experiments.sweeps import lr_sweep, plot_family, sweep_family

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


def run(task, settings: dict, seed: int) -> dict:
    """Every set-up's lr sweep at every width, all from the same seed."""

    def sweep_at(setup: str, width: int) -> dict:
        def train_at(lr: float) -> dict:
            model = build(task, width, 3, setup, seed)
            optimizer = dual_sgd(model, lr) if setup == "dual" else adam(model, lr)
            return train(model, optimizer, task, settings["steps"], settings["batch_size"], seed)

        return lr_sweep(train_at, settings["log2_lrs"][setup])

    return sweep_family(SETUPS, "width", settings["widths"], sweep_at)


def plot(results: dict, path):
    return plot_family(results["setups"], "width", "viridis",
                       f"LR transfer across width, 3-layer MLP, {results['task']}", path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = add_task_flags(experiment_parser(__doc__), "widths", "comma-separated widths")
    args = parser.parse_args(argv)
    settings = mode_settings(args, SETTINGS, widths=args.widths)
    paths = output_paths(args, NAME)
    with torch_threads(args.threads):
        task = load_task(args.cifar, settings["n_train"])
        setups = run(task, settings, args.seed)
    settings["log2_lrs"] = {setup: list(ks) for setup, ks in settings["log2_lrs"].items()}
    return finish(NAME, argv, args, paths, {"task": task.name, "settings": settings, "setups": setups}, plot)


if __name__ == "__main__":
    main()
