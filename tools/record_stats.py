"""Statistics of a set of runs against the record target (a record needs p < 0.01 that the mean < 3.28).

    python -m tools.record_stats records/run1.txt records/run2.txt ... [--target 3.28]

Each LOG is a train_gpt.py log.txt, a metrics.jsonl, or a run's --out-dir holding either. A run's
final validation loss is its last validation line. Prints each run, then n, the mean, the sample
standard deviation and the one-sided one-sample t-test p-value for "the mean is below the target".
With one run there is no standard deviation or test: the report says so after the mean.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

NUMBER = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
# train_gpt.py writes `step 1750/1750 val_loss 3.2791 train_time 181.2s`; `key:value` and ms also parse.
VAL_LINE = re.compile(rf"^step[ :]\s*\d+/\d+\s.*?\bval_loss[ :=]\s*{NUMBER}")
TRAIN_TIME = re.compile(rf"\btrain_time[ :=]\s*{NUMBER}(ms|s)?\b")


class Run(NamedTuple):
    path: Path
    val_loss: float
    train_time_s: float | None


class Summary(NamedTuple):
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1)
    t: float
    p: float  # one-sided: P(T_{n-1} <= t), small when the mean is below the target


# ----------------------------------------------------------------------------------------------------
# Student's t distribution


def _continued_fraction(coefficient, tol: float = 1e-15, max_terms: int = 10_000) -> float:
    """1 + a1/(1 + a2/(1 + ...)) with a_j = coefficient(j), by the modified Lentz method."""
    tiny = 1e-300
    value, c, d = 1.0, 1.0, 0.0
    for j in range(1, max_terms):
        a = coefficient(j)
        d = 1 + a * d
        d = 1 / (d if d != 0 else tiny)
        c = 1 + a / c
        c = c if c != 0 else tiny
        value *= c * d
        if abs(c * d - 1) < tol:
            return value
    raise ArithmeticError(f"continued fraction did not converge in {max_terms} terms")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1.

    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / (1 + d1/(1 + d2/(1 + ...))) with
    d_{2m} = m(b-m)x / ((a+2m-1)(a+2m)) and d_{2m+1} = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1)); the fraction
    converges fast for x < (a+1)/(a+b+2), and I_x(a, b) = 1 - I_{1-x}(b, a) covers the rest.
    """
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(b, a, 1 - x)

    def coefficient(j: int) -> float:
        m = j // 2
        if j % 2 == 0:
            return m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        return -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))

    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (
        math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / _continued_fraction(coefficient)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom: one tail is I_{df/(df+t^2)}(df/2, 1/2) / 2."""
    if math.isnan(t):
        return math.nan
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0
    return tail if t < 0 else 1 - tail


def summarize(losses: list[float], target: float) -> Summary:
    """n, mean, sample std, and the one-sided one-sample t-test of H1: mean < target (needs n >= 2)."""
    n = len(losses)
    if n < 2:
        raise ValueError(f"a standard deviation and a t-test need at least 2 runs, got {n}")
    mean = sum(losses) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (n - 1))
    if std == 0:  # identical losses: the test degenerates to comparing the mean with the target
        t = math.copysign(math.inf, mean - target) if mean != target else math.nan
    else:
        t = (mean - target) / (std / math.sqrt(n))
    return Summary(n, mean, std, t, t_cdf(t, n - 1))


# ----------------------------------------------------------------------------------------------------
# Reading runs


def read_run(path: Path) -> Run:
    """The final validation of one run: a log.txt, a metrics.jsonl, or a run directory holding one."""
    if path.is_dir():
        found = [path / name for name in ("metrics.jsonl", "log.txt") if (path / name).is_file()]
        if not found:
            raise ValueError(f"{path}: no metrics.jsonl or log.txt (expected a train_gpt.py --out-dir)")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    run = _from_metrics(path) if path.suffix == ".jsonl" else _from_log(path)
    if run is None:
        raise ValueError(f"{path}: no validation line (expected `step N/N val_loss X ...`)")
    return run


def _from_metrics(path: Path) -> Run | None:
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON lines ({error})") from None
    val = [r for r in records if "val_loss" in r]
    if not val:
        return None
    last = val[-1]
    time_s = last.get("train_time_s")
    return Run(path, float(last["val_loss"]), None if time_s is None else float(time_s))


def _from_log(path: Path) -> Run | None:
    run = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = VAL_LINE.match(line)
        if match:
            time_match = TRAIN_TIME.search(line)
            time_s = None
            if time_match:
                time_s = float(time_match.group(1)) / (1000 if time_match.group(2) == "ms" else 1)
            run = Run(path, float(match.group(1)), time_s)
    return run


def report(runs: list[Run], target: float) -> str:
    """One line per run, then the statistics."""
    width = max(len(str(r.path)) for r in runs)
    lines = [f"{'run':<{width}}  val_loss  train_time"]
    for r in runs:
        time_text = "-" if r.train_time_s is None else f"{r.train_time_s:.1f}s"
        lines.append(f"{str(r.path):<{width}}  {r.val_loss:.4f}    {time_text}")
    if len(runs) < 2:
        lines.append(f"n 1  mean {runs[0].val_loss:.5f}  (no std or t-test: they need at least 2 runs)")
    else:
        s = summarize([r.val_loss for r in runs], target)
        lines.append(f"n {s.n}  mean {s.mean:.5f}  std {s.std:.5f} (sample)")
        lines.append(f"one-sided t-test, H1: mean < {target}: t {s.t:.3f}, df {s.n - 1}, p {s.p:.3g}"
                     f" (a record needs p < 0.01)")
    times = [r.train_time_s for r in runs if r.train_time_s is not None]
    if times:
        lines.append(f"mean train_time {sum(times) / len(times):.1f}s over {len(times)} runs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.record_stats",
                                     description="Mean, std and t-test p-value of runs' final val loss.")
    parser.add_argument("logs", nargs="+", type=Path, metavar="LOG",
                        help="log.txt, metrics.jsonl, or a run's --out-dir")
    parser.add_argument("--target", type=float, default=3.28, help="target val loss (default 3.28)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(path) for path in args.logs]
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print(report(runs, args.target))


if __name__ == "__main__":
    main()
