"""Plot train/val loss against step and against training time for one or several runs.

    python -m tools.plot out/demo [out/other ...] [--out loss.png]

Each RUN_DIR holds the metrics.jsonl written by train_gpt.py.
"""

import argparse
import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no metrics.jsonl (expected the --out-dir of a train_gpt.py run)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Two panels (loss vs step, loss vs training time); train loss thin, val loss with markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        name = Path(run_dir).name
        train = [r for r in records if "train_loss" in r]
        val = [r for r in records if "val_loss" in r]
        line, = by_step.plot([r["step"] for r in train], [r["train_loss"] for r in train], lw=0.8,
                             alpha=0.6, label=f"{name} train")
        by_step.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=line.get_color(),
                     label=f"{name} val")
        by_time.plot([r["train_time_s"] for r in val], [r["val_loss"] for r in val], "o-",
                     color=line.get_color(), label=f"{name} val")
    by_step.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss vs step")
    by_time.set(xlabel="training time (s)", ylabel="validation cross-entropy", title="loss vs time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Plot loss curves of train_gpt.py runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("loss.png"))
    args = parser.parse_args()
    print(plot_runs(args.run_dirs, args.out))


if __name__ == "__main__":
    main()
