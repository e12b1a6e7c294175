"""bench.gpu_check: the one-command first GPU run, in its --smoke form on a CPU (the 2025-07-12 preset's,
which the training loop runs whole), and record #46's check: its plan and what it counts as passing."""

import json
import math

import numpy as np
import pytest

from bench import gpu_check
from data.tokenizer import EOT

PROVEN = ("--preset", "speedrun-2025-07-12")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, object]:
    out_dir = tmp_path_factory.mktemp("gpu_check")
    return gpu_check.main(["--smoke", *PROVEN, "--out-dir", str(out_dir)]), out_dir


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
        gpu_check.main(["--smoke", *PROVEN, "--out-dir", str(tmp_path)])
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
        gpu_check.main(["--smoke", *PROVEN, "--out-dir", str(tmp_path)])
    assert (tmp_path / "train_gpt.out").exists() and not (tmp_path / "gpu_check.json").exists()


@pytest.mark.parametrize("preset, shapes, windows, first_steps, planned_s", [
    ("speedrun", 3, [384, 896, 1408, 1664], [0, 71, 142, 212], 18.8),
    ("speedrun-2025-07-12", 1, [128 * k for k in range(1, 15)], None, 33.8),
])
def test_the_full_check_crosses_every_shape_and_window_in_well_under_8_minutes(preset, shapes, windows,
                                                                               first_steps, planned_s):
    # Record #46 in miniature: 16384, 32768, 49152 tokens a step (1, 2, 3 rows of 16384), each stage at
    # its window, then the final 13 blocks from step 212; the plan is seconds of model FLOPs at 400 TFLOP/s,
    # leaving over 7 of the 8 minutes to compilation.
    cfg = gpu_check.parse_config(["--preset", preset, *gpu_check.CHECKS[preset]["full"]])
    schedule = gpu_check.schedule_of(cfg)
    assert gpu_check.batch_shapes(schedule) == shapes and schedule.windows() == windows
    assert first_steps is None or schedule.first_steps() == first_steps
    assert [schedule.at(s).tokens for s in schedule.first_steps()][:4] == \
        ([16384, 32768, 49152, 49152] if preset == "speedrun" else [49152] * 4)
    assert gpu_check.planned_compute_s(cfg) == pytest.approx(planned_s, rel=0.01)


def test_the_46_check_passes_only_with_one_training_graph_per_batch_shape(smoke, tmp_path, monkeypatch):
    # The smoke run's records with the graphs counted as record #46's compressed schedule needs (3 batch
    # shapes), then as a loop that trains at one shape throughout would count them (1).
    _, out_dir = smoke
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out_dir / "run" / "summary.json").read_text())
    for graphs, code in ((3, None), (1, 1)):
        ran = summary | {"graphs_training": graphs}
        monkeypatch.setattr(gpu_check, "run", lambda out_dir, flags, cfg, ran=ran: (records, ran, 1.0))
        folder = tmp_path / str(graphs)
        if code is None:
            assert gpu_check.main(["--smoke", "--out-dir", str(folder)])["passed"]
        else:
            with pytest.raises(SystemExit) as failed:
                gpu_check.main(["--smoke", "--out-dir", str(folder)])
            assert failed.value.code == code
        table = (folder / "gpu_check.md").read_text()
        verdict = "ok" if code is None else "FAILED"
        assert f"- {verdict}: one training graph per batch shape (3)" in table
        assert "--preset speedrun " in table
