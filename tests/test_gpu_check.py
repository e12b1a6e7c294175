"""bench.gpu_check: the one-command first GPU run, in its --smoke form on a CPU."""

import json
import math

import numpy as np
import pytest

from bench import gpu_check
from data.tokenizer import EOT


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, object]:
    out_dir = tmp_path_factory.mktemp("gpu_check")
    return gpu_check.main(["--smoke", "--out-dir", str(out_dir)]), out_dir


def test_the_smoke_check_passes_every_check_and_writes_json_and_markdown(smoke):
    report, out_dir = smoke
    assert report["passed"] and all(report["checks"].values())
    assert json.loads((out_dir / "gpu_check.json").read_text()) == json.loads(json.dumps(report))
    table = (out_dir / "gpu_check.md").read_text()
    assert "| 14 |" in table and "1 / 1 / 0" in table and "FAILED" not in table


def test_the_smoke_check_reports_the_runs_figures(smoke):
    report, _ = smoke
    figures = report["figures"]
    assert figures["step"] == 14 and figures["graphs_in_timed_run"] == 0
    for name in ("train_time_s", "step_ms", "tokens_per_s", "peak_memory_gib"):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert figures["mfu"] is None  # a CPU has no known peak
    assert report["windows"] == [128 * k for k in range(1, 15)]
    assert [step for step, _ in report["val_loss"]] == [0, 7, 14]


def test_a_failed_check_exits_1(smoke, tmp_path, monkeypatch):
    # The smoke run's own records, with a graph compiled inside the timed run (as a recompile would).
    _, out_dir = smoke
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out_dir / "run" / "summary.json").read_text()) | {"graphs_in_timed_run": 1}
    monkeypatch.setattr(gpu_check, "run", lambda out_dir, flags, cfg: (records, summary, 1.0))
    with pytest.raises(SystemExit) as failed:
        gpu_check.main(["--smoke", "--out-dir", str(tmp_path)])
    assert failed.value.code == 1
    assert "- FAILED: nothing compiled in the timed run" in (tmp_path / "gpu_check.md").read_text()


def test_synthetic_documents_start_at_bos_and_follow_their_stride():
    tokens = gpu_check.synthetic_tokens(20_000, mean_document=100, seed=0).astype(np.int64)
    assert tokens[0] == EOT and 150 < (tokens == EOT).sum() < 250  # ~200 documents of mean 100
    previous, following = tokens[:-1], tokens[1:]
    inside = (previous != EOT) & (following != EOT)
    clean = (following - previous) % gpu_check.VOCAB_USED == gpu_check.STRIDE
    # A step is clean when neither id was replaced: about (1 - NOISE)^2 = 81% of them.
    assert clean[inside].mean() == pytest.approx((1 - gpu_check.NOISE) ** 2, abs=0.02)


def test_a_run_past_the_time_limit_ends_naming_the_limit_and_its_output(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "TIMEOUT_S", 0.5)  # train_gpt.py only starts in that time
    limit = r"ended with timeout after 0.5 s \(all of its output: .*train_gpt.out\)"
    with pytest.raises(SystemExit, match=limit):
        gpu_check.main(["--smoke", "--out-dir", str(tmp_path)])
    assert (tmp_path / "train_gpt.out").exists() and not (tmp_path / "gpu_check.json").exists()
