"""Run operations of train_gpt.py: exact resume, signals, NaN stop, record mode, warm-up, wandb, the log."""

import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import train_gpt

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--val-every", "3", "--log-every", "1", "--val-tokens", "2048", "--sample-tokens", "0", "--no-plot"]


def losses(out_dir: Path) -> list[tuple[int, str, float]]:
    """(step, kind, value) of every train and val record, in order; values at full float precision."""
    rows = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        kind = "train_loss" if "train_loss" in record else "val_loss"
        rows.append((record["step"], kind, record[kind]))
    return rows


def train(out_dir: Path, *flags: str) -> dict:
    return train_gpt.main(train_gpt.parse_config(["--out-dir", str(out_dir), *FAST, *flags]))


def test_exit_and_resume_reproduce_the_straight_run_bitwise(tmp_path):
    train(tmp_path / "straight", "--max-steps", "6")
    result = train(tmp_path / "split", "--max-steps", "6", "--exit-after-steps", "3")
    assert result["step"] == 3
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == "step_000003"
    train(tmp_path / "split", "--max-steps", "6", "--resume", "auto")
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_resume_across_two_gloo_processes_is_bitwise(tmp_path):
    def torchrun(out_dir: Path, *flags: str) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "train_gpt.py", "--out-dir", str(out_dir), "--batch-size", "4", "--max-steps", "4", *FAST,
                   *flags]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun(tmp_path / "straight")
    torchrun(tmp_path / "split", "--exit-after-steps", "2")
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints" / "step_000002").iterdir()) == [
        "rank0.pt", "rank1.pt", "shared.pt"]
    torchrun(tmp_path / "split", "--resume", "auto")
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train(tmp_path, "--max-steps", "1", "--save-every", "1")
    with pytest.raises(SystemExit, match="saved for model"):
        train(tmp_path, "--max-steps", "2", "--resume", "auto", "--seq-len", "64", "--val-seq-len", "64",
              "--tokens-per-step", "512")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    command = [sys.executable, "train_gpt.py", "--out-dir", str(tmp_path), "--max-steps", "200", *FAST]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"train_loss"' in metrics.read_text()):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stdout
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    saved_step = int(latest.removeprefix("step_"))
    assert 1 <= saved_step < 200
    assert max(step for step, kind, _ in losses(tmp_path) if kind == "train_loss") == saved_step


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # The architecture is hard to blow up (norms everywhere, soft-capped logits), so the loss is
    # poisoned directly: the 4th training forward returns NaN.
    forward = train_gpt.GPT.forward
    calls = {"train": 0}

    def poisoned(self, idx, targets=None, window=None):
        loss = forward(self, idx, targets, window)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_gpt.GPT, "forward", poisoned)
    with pytest.raises(SystemExit, match="non-finite train loss"):
        train(tmp_path, "--max-steps", "8", "--save-every", "1")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000003"  # the last good step
    assert "step 4: train loss is nan" in (tmp_path / "log.txt").read_text()


def test_record_mode_stops_at_the_target_and_writes_the_record_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train(tmp_path / "run", "--max-steps", "30", "--target-val-loss", "9.0")
    assert result["val_loss"] <= 9.0 and result["step"] < 30
    # it stopped at the FIRST validation at or below the target
    vals = [v for _, kind, v in losses(tmp_path / "run") if kind == "val_loss"]
    assert all(v > 9.0 for v in vals[:-1]) and vals[-1] <= 9.0
    records = list((tmp_path / "records").glob("*.txt"))
    assert len(records) == 1 and "target val_loss 9.0 reached" in records[0].read_text()


def test_kernel_warmup_does_not_change_the_trajectory(tmp_path):
    train(tmp_path / "plain", "--max-steps", "4")
    train(tmp_path / "warm", "--max-steps", "4", "--warmup-kernel-steps", "2")
    assert losses(tmp_path / "warm") == losses(tmp_path / "plain")


def test_log_starts_with_the_source_and_environment(tmp_path):
    train(tmp_path, "--max-steps", "1")
    log = (tmp_path / "log.txt").read_text()
    assert log.index("# train_gpt.py") < log.index("# model/gpt.py") < log.index("# optim/muon.py")
    assert (ROOT / "optim" / "newton_schulz.py").read_text() in log  # the exact source, whole
    assert "torch " in log and "config {" in log
    assert log.index("# optim/muon.py") < log.index("step 0/1 val_loss")


def test_wandb_offline_logs_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tmp_path, "--max-steps", "2", "--wandb", "--run-name", "offline-test")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and list(runs[0].glob("*.wandb"))[0].stat().st_size > 0


def test_a_wandb_failure_warns_once_and_training_continues(tmp_path, monkeypatch, capsys):
    def broken_init(**kwargs):
        raise RuntimeError("not logged in")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=broken_init))
    result = train(tmp_path, "--max-steps", "2", "--wandb")
    assert result["step"] == 2
    assert capsys.readouterr().err.count("warning: wandb disabled (RuntimeError: not logged in)") == 1
