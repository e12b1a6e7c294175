"""Plot train/val loss against step and against training time for one or several runs.

    python -m tools.plot out/demo [out/other ...] [--out loss.png]

Each RUN_DIR holds the metrics.jsonl written by train_gpt.py (training/plot.py draws them).
"""

import argparse
from pathlib import Path

from training.plot import plot_runs


def main() -> None:
    parser = argparse.ArgumentParser(description="Plot loss curves of train_gpt.py runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("loss.png"))
    args = parser.parse_args()
    print(plot_runs(args.run_dirs, args.out))


if __name__ == "__main__":
    main()
