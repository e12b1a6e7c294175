"""What every experiment shares: its command line, the results JSON, the figure, best-LR bookkeeping."""

import argparse
import contextlib
import datetime
import json
import math
import platform
from pathlib import Path

import torch

OUT_ROOT = Path("out/experiments")
# Top of the loss axes: 1.3·ln(10), above the 10-class uniform guess; a run that ends higher made
# no progress or blew up, and is drawn running off the top.
LOSS_CEILING = 3.0


def experiment_parser(description: str) -> argparse.ArgumentParser:
    """The flags every experiment takes: --quick, --out, --figure, --seed, --threads."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the small run the test suite uses (seconds on a 2-core CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory for the results JSON and figure (default {OUT_ROOT}/full or /quick)")
    parser.add_argument("--figure", type=Path, default=None, help="the PNG's path (default: in --out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small ops lose more to thread "
                             "hand-offs than they gain, most of all on a shared CPU)")
    return parser


def int_list(text: str) -> list[int]:
    """argparse type for a comma-separated list of positive ints, e.g. --widths 32,64,128."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 32,64,128, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with torch using n CPU threads, then restore the previous count."""
    if n < 1:
        raise SystemExit(f"--threads must be >= 1, got {n}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def output_paths(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    """(results JSON, figure PNG) for experiment `name`, creating their directories."""
    out = args.out or OUT_ROOT / ("quick" if args.quick else "full")
    figure = args.figure or out / f"{name}.png"
    for path in (out, figure.parent):
        if path.exists() and not path.is_dir():
            raise SystemExit(f"--out/--figure: {path} is a file; give a directory for --out and a .png path")
        path.mkdir(parents=True, exist_ok=True)
    return out / f"{name}.json", figure


def mode_settings(args: argparse.Namespace, table: dict[str, dict], **flags) -> dict:
    """A copy of table["quick"] or table["full"], with each flag given (not None) put in its place."""
    settings = dict(table["quick" if args.quick else "full"])
    settings.update({key: value for key, value in flags.items() if value is not None})
    return settings


def finish(name: str, argv: list[str], args: argparse.Namespace, paths: tuple[Path, Path],
           results: dict, plot) -> dict:
    """Write the results JSON (with the experiment, mode and seed) and plot(results, figure path)."""
    json_path, png_path = paths
    results = {"experiment": name, "mode": "quick" if args.quick else "full", "seed": args.seed, **results}
    write_results(json_path, name, argv, results, args.threads)
    plot(results, png_path)
    print(f"results {json_path}, figure {png_path}")
    return results


def finite_or_none(x: float) -> float | None:
    """A loss for the JSON: None where the run diverged (NaN or inf), which JSON cannot hold."""
    return float(x) if math.isfinite(x) else None


def best_lr(lrs: list[float], losses: list[float | None]) -> tuple[float | None, float | None]:
    """(lr, loss) of the lowest finite loss; (None, None) when every run diverged."""
    finite = [(loss, lr) for lr, loss in zip(lrs, losses, strict=True) if loss is not None]
    if not finite:
        return None, None
    loss, lr = min(finite)
    return lr, loss


def log2_spread(values: list[float | None]) -> float | None:
    """log2(max / min) of the best LRs: how many factors of 2 the best LR moves (None if any is None)."""
    if any(v is None for v in values):
        return None
    return math.log2(max(values) / min(values))


def write_results(path: Path, name: str, argv: list[str], results: dict, threads: int) -> Path:
    """The results with what produced them: command, date, torch version, the runs' torch threads
    (--threads; torch's count here may already be restored), machine."""
    record = {
        "command": " ".join([f"python -m experiments.{name}", *argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": threads,
        "machine": platform.processor() or platform.machine(),
        **results,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a small PNG (dpi 90) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def integer_ticks(ax) -> None:
    """Tick the x axis at integers only (log2 learning rates)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def log_ticks(ax, values: list[float]) -> None:
    """A log x axis ticked at `values`, written as plain numbers."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.xaxis.set_minor_locator(NullLocator())


def plain_log_y(ax) -> None:
    """A log y axis labelled at 1, 2, 5 times powers of ten, as plain numbers (0.5, 1, 2)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg back end (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
