"""Loss curves of runs, from their metrics.jsonl (training/runlog.py writes it): train and val loss
against step, and val loss against training time. train_gpt.py draws its run's at the end (loss.png);
`python -m tools.plot` draws any runs side by side.
"""

import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl. A line that is not one (cut off by a kill or a full disk,
    or not text) is skipped, with one warning on stderr naming the first such line and their count."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no metrics.jsonl (expected the --out-dir of a train_gpt.py run)")
    records, bad = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # JSON's errors and UTF-8's alike
            record = None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        else:
            bad.append(number)
    if bad:
        print(f"warning: {path}:{bad[0]}: not a metrics record (cut off?); skipped it and "
              f"{len(bad) - 1} other line(s) like it", file=sys.stderr)
    return records


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

