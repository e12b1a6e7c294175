"""Learning-rate transfer across depth, with and without the modular norm's per-layer step shares.

    python -m experiments.depth [--quick] [--cifar DIR] [--depths 3,6,12,24] [--out DIR] [--figure PNG]

The bias-free ReLU MLP of experiments/mlp.py at one width and several depths L (number of Linear
layers), orthogonal init, dualized SGD (no momentum), over a grid of learning rates (powers of 2):
  plain    every layer steps by lr in its RMS→RMS norm, so the whole step grows with L;
  modular  layer l steps by lr·s_l with s_l its share from experiments.modular: masses 1 per Linear,
           ReLU sensitivity 1, so s_l = 1/L and the step is lr in the modular norm at every depth.
The score is the train-set cross-entropy after the last step; the claim (Large et al. 2024) is that
with the shares the best lr no longer depends on depth, while without them it falls about as 1/L.
"""

import sys

from experiments.datasets import add_task_flags, load_task
from experiments.mlp import build, dual_sgd, train
from experiments.report import experiment_parser, finish, mode_settings, output_paths, torch_threads
from experiments.sweeps import lr_sweep, plot_family, sweep_family

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


def run(task, settings: dict, seed: int) -> dict:
    """Both variants' lr sweeps at every depth, all from the same seed."""

    def sweep_at(variant: str, depth: int) -> dict:
        def train_at(lr: float) -> dict:
            model = build(task, settings["width"], depth, "dual", seed)
            optimizer = dual_sgd(model, lr, modular=variant == "modular")
            return train(model, optimizer, task, settings["steps"], settings["batch_size"], seed)

        return lr_sweep(train_at, settings["log2_lrs"])

    return sweep_family(VARIANTS, "depth", settings["depths"], sweep_at)


def plot(results: dict, path):
    title = f"LR transfer across depth, width {results['settings']['width']} MLP, {results['task']}"
    return plot_family(results["variants"], "depth", "plasma", title, path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = add_task_flags(experiment_parser(__doc__), "depths", "comma-separated depths (>= 2)")
    args = parser.parse_args(argv)
    settings = mode_settings(args, SETTINGS, depths=args.depths)
    if min(settings["depths"]) < 2:
        parser.error(f"--depths: each must be >= 2 (an input and an output layer), got {settings['depths']}")
    paths = output_paths(args, NAME)
    with torch_threads(args.threads):
        task = load_task(args.cifar, settings["n_train"])
        variants = run(task, settings, args.seed)
    settings["log2_lrs"] = list(settings["log2_lrs"])
    results = {"task": task.name, "settings": settings, "variants": variants}
    return finish(NAME, argv, args, paths, results, plot)


if __name__ == "__main__":
    main()
