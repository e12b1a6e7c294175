"""bench.gpu: the smoke run exercises every section on a CPU and writes a complete report."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("ceilings", "newton_schulz", "optimizer_step", "train_124m", "train_demo", "goals", "wall_s")


def numbers(tree) -> list[float]:
    """Every int and float in a JSON tree (booleans and None excluded)."""
    if isinstance(tree, dict):
        return [x for value in tree.values() for x in numbers(value)]
    if isinstance(tree, list):
        return [x for value in tree for x in numbers(value)]
    is_number = isinstance(tree, (int, float)) and not isinstance(tree, bool)
    return [tree] if is_number else []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    """One `--smoke` run in a subprocess: (the JSON report, the markdown)."""
    out_dir = tmp_path_factory.mktemp("bench_gpu")
    # One thread: toy sizes gain nothing from two, and on a CPU shared with other jobs a second
    # spinning OpenMP thread made the run 3x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--out-dir", str(out_dir)], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=300)
    [json_path] = out_dir.glob("gpu-smoke-cpu-*.json")
    [md_path] = out_dir.glob("gpu-smoke-cpu-*.md")
    return json.loads(json_path.read_text()), md_path.read_text()


def test_smoke_report_has_every_section_with_finite_positive_numbers(smoke):
    report, _ = smoke
    assert report["smoke"] is True
    for section in SECTIONS:
        values = numbers(report[section])
        assert values, f"{section} holds no figures"
        assert all(math.isfinite(x) and x > 0 for x in values), f"{section}: {report[section]}"


def test_smoke_times_every_coefficient_set_eager_and_compiled_and_three_optimizers(smoke):
    report, _ = smoke
    assert set(report["newton_schulz"]["sets"]) == set(gpu.COEFFICIENTS)
    assert all(set(row) == {"eager", "compiled"} for row in report["newton_schulz"]["sets"].values())
    assert set(report["optimizer_step"]["optimizers"]) == {"optim.Muon", "torch.optim.Muon",
                                                           "torch.optim.AdamW"}


def test_smoke_training_cases_report_step_optimizer_share_and_mfu(smoke):
    report, _ = smoke
    for case in ("train_124m", "train_demo"):
        row = report[case]
        assert row["optimizer_ms"] < row["step_ms"]  # the optimizer is timed inside the step
        assert 0 < row["optimizer_share_recipe"] <= row["optimizer_share"] < 1
        assert {"tokens_per_s", "mfu", "mfu_of_measured", "peak_memory_gib"} <= row.keys()
    assert report["train_124m"]["window"] is not None  # the speedrun's sliding window is exercised


def test_smoke_writes_markdown_tables_and_leaves_the_docs_alone(smoke):
    _, md = smoke
    assert "(smoke: toy sizes)" in md
    for header in ("| coefficients |", "| optimizer |", "| case |", "| goal |"):
        assert header in md
    assert "(smoke: toy sizes)" not in (ROOT / "docs" / "BENCHMARKS.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_full_run_without_a_gpu_refuses_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.main([])
    assert exit_info.value.code == 2
    assert "--smoke" in capsys.readouterr().err
