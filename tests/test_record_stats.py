"""tools.record_stats: Student-t CDF against closed forms and t-tables, run parsing, the t-test p-value."""

import json
import math
import statistics

import pytest

from tools import record_stats
from tools.record_stats import incomplete_beta, read_run, summarize, t_cdf


def t_density(u: float, df: int) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df))


def t_cdf_by_simpson(t: float, df: int, intervals: int = 20_000) -> float:
    """P(T <= t) = 1/2 + sign(t) * integral of the density over [0, |t|], by Simpson's rule."""
    h = abs(t) / intervals
    weights = [1 if i in (0, intervals) else 4 if i % 2 else 2 for i in range(intervals + 1)]
    area = h / 3 * sum(w * t_density(i * h, df) for i, w in enumerate(weights))
    return 0.5 + math.copysign(area, t)


def write_log(path, val_losses, train_time=181.2):
    lines = ["config {...}"]
    lines += [f"step {s}/1750 val_loss {v:.4f} train_time {train_time * s / 1750:.1f}s"
              for s, v in zip((1500, 1625, 1750), val_losses, strict=True)]
    lines.append(f"done: 1750 steps, final val_loss {val_losses[-1]:.4f}, training time {train_time:.1f}s")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("t", [-40.0, -3.0, -0.5, 0.0, 0.7, 2.0, 12.0])
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    # df 1 is the Cauchy distribution; df 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)). Round-off only.
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


@pytest.mark.parametrize("df, t, upper_tail", [
    (1, 31.821, 0.01), (4, 3.747, 0.01), (9, 2.821, 0.01), (29, 2.462, 0.01),
    (5, 2.015, 0.05), (10, 2.228, 0.025), (20, 2.845, 0.005),
])
def test_t_cdf_matches_t_table_critical_values(df, t, upper_tail):
    # tables print t to 3 decimals: that moves the tail probability by at most ~5e-5 here
    assert 1 - t_cdf(t, df) == pytest.approx(upper_tail, abs=5e-5)
    assert t_cdf(-t, df) == pytest.approx(upper_tail, abs=5e-5)


def test_t_cdf_tends_to_the_normal_for_many_degrees_of_freedom():
    assert t_cdf(-1.959964, 10**7) == pytest.approx(0.025, abs=1e-6)


def test_incomplete_beta_known_values():
    assert incomplete_beta(1, 1, 0.3) == pytest.approx(0.3, abs=1e-14)  # uniform
    assert incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - sum of binomial terms
    assert incomplete_beta(0.5, 0.5, 0.5) == pytest.approx(0.5, abs=1e-14)  # symmetric


@pytest.mark.parametrize("losses", [
    [3.2791, 3.2775, 3.2802, 3.2768, 3.2785],
    [3.2812, 3.2779, 3.2801],
    [3.2790, 3.2770, 3.2795, 3.2801, 3.2760, 3.2788, 3.2779, 3.2783, 3.2797, 3.2771],
])
def test_p_value_equals_the_integrated_t_density(losses):
    s = summarize(losses, 3.28)
    assert s.n == len(losses)
    assert s.mean == pytest.approx(statistics.fmean(losses), abs=1e-12)
    assert s.std == pytest.approx(statistics.stdev(losses), abs=1e-12)
    t = (s.mean - 3.28) / (s.std / math.sqrt(s.n))
    # Simpson's error with 20,000 intervals is far below 1e-10 for these densities
    assert s.p == pytest.approx(t_cdf_by_simpson(t, s.n - 1), abs=1e-10)


def test_five_runs_just_below_target_fall_between_the_t_table_rows():
    # deviations (-2..2) x 1e-3: sample std sqrt(2.5e-6); t = -0.0016 / (std / sqrt 5) = -2.2627 with
    # df 4, which the t-table brackets between 2.132 (p 0.05) and 2.776 (p 0.025)
    losses = [3.2784 + 0.001 * d for d in (-2, -1, 0, 1, 2)]
    s = summarize(losses, 3.28)
    assert s.std == pytest.approx(math.sqrt(2.5e-6), rel=1e-9)
    assert s.t == pytest.approx(-2.2627417, rel=1e-6)
    assert 0.025 < s.p < 0.05


def test_identical_losses_below_the_target_give_p_zero():
    assert summarize([3.27, 3.27], 3.28).p == 0.0
    assert summarize([3.29, 3.29], 3.28).p == 1.0


def test_log_metrics_and_run_dir_give_the_last_validation(tmp_path):
    log = write_log(tmp_path / "a.txt", [3.31, 3.29, 3.2791])
    assert read_run(log) == (log, 3.2791, 181.2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [{"step": 1, "train_loss": 5.0}, {"step": 1750, "val_loss": 3.27912345, "train_time_s": 180.5},
               {"step": 1750, "train_loss": 3.3}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_log(run_dir / "log.txt", [3.3, 3.3, 3.2791])
    # a run dir prefers metrics.jsonl: it keeps more digits than the log line
    assert read_run(run_dir) == (run_dir / "metrics.jsonl", 3.27912345, 180.5)


def test_modded_nanogpt_style_lines_parse_too(tmp_path):
    log = tmp_path / "r.txt"
    log.write_text("    print(f'step:{step}/{n} val_loss:{v:.4f}')\nstep:1750/1750 val_loss:3.2779 "
                   "train_time:179480ms step_avg:102.56ms\n")
    assert read_run(log) == (log, 3.2779, 179.48)


def test_command_prints_runs_and_statistics(tmp_path, capsys):
    losses = [3.2791, 3.2775, 3.2802]
    paths = [str(write_log(tmp_path / f"{i}.txt", [3.3, 3.29, v], 180 + i)) for i, v in enumerate(losses)]
    record_stats.main([*paths, "--target", "3.28"])
    out = capsys.readouterr().out.splitlines()
    s = summarize(losses, 3.28)
    assert out[1].split() == [paths[0], "3.2791", "180.0s"]
    assert out[4] == f"n 3  mean {s.mean:.5f}  std {s.std:.5f} (sample)"
    assert out[5].endswith(f"p {s.p:.3g} (a record needs p < 0.01)")
    assert out[6] == "mean train_time 181.0s over 3 runs"


def test_one_run_reports_its_mean_and_says_why_there_is_no_test(tmp_path, capsys):
    path = str(write_log(tmp_path / "only.txt", [3.3, 3.29, 3.2791]))
    record_stats.main([path])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == [path, "3.2791", "181.2s"]
    assert out[2:] == ["n 1  mean 3.27910  (no std or t-test: they need at least 2 runs)",
                       "mean train_time 181.2s over 1 runs"]
    assert "nan" not in "".join(out)
    with pytest.raises(ValueError, match="need at least 2 runs, got 1"):
        summarize([3.2791], 3.28)


def test_a_file_without_validation_lines_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("step 1/10 train_loss 5.0\n")
    with pytest.raises(SystemExit, match=f"error: {empty}: no validation line"):
        record_stats.main([str(empty)])
    with pytest.raises(SystemExit, match="missing: no such file"):
        record_stats.main([str(tmp_path / "missing")])
