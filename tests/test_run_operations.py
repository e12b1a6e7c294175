"""Run operations of train_gpt.py: exact resume, signals, NaN stop, record mode, warm-up, wandb, the log."""

import json
import signal
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import torchrun_pair

import train_gpt
from model import GPT
from optim import Muon

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


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory) -> list[tuple[int, str, float]]:
    """The losses of one straight 6-step run, which the resumed and the warmed-up runs must reproduce."""
    out_dir = tmp_path_factory.mktemp("straight")
    train(out_dir, "--max-steps", "6")
    return losses(out_dir)


def test_exit_and_resume_reproduce_the_straight_run_bitwise(tmp_path, straight_losses):
    result = train(tmp_path, "--max-steps", "6", "--exit-after-steps", "3")
    assert result["step"] == 3
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000003"
    train(tmp_path, "--max-steps", "6", "--resume", "auto")
    assert losses(tmp_path) == straight_losses


def test_resume_across_two_gloo_processes_is_bitwise(tmp_path, gloo_pair_run):
    # Adam every other step (conftest's GLOO_PAIR_FLAGS): saved after 3 steps, the last of which its
    # groups rested at (step 2), each rank's checkpoint holds its own gradient accumulated there, which
    # the update at step 3 adds to and averages over the ranks.
    torchrun_pair(tmp_path / "split", "--exit-after-steps", "3")
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints" / "step_000003").iterdir()) == [
        "rank0.pt", "rank1.pt", "shared.pt"]
    torchrun_pair(tmp_path / "split", "--resume", "auto")
    assert losses(tmp_path / "split") == losses(gloo_pair_run.out_dir)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train(tmp_path, "--max-steps", "1", "--save-every", "1")
    with pytest.raises(SystemExit, match="saved for model"):
        train(tmp_path, "--max-steps", "2", "--resume", "auto", "--seq-len", "64", "--val-seq-len", "64",
              "--tokens-per-step", "512")


def test_resume_auto_without_a_checkpoint_says_it_starts_a_new_run(tmp_path, capsys):
    result = train(tmp_path, "--max-steps", "1", "--resume", "auto")
    assert result["step"] == 1
    line = f"--resume auto: no checkpoint in {tmp_path / 'checkpoints'}; a new run starts at step 0"
    assert line in capsys.readouterr().out.splitlines() and line in (tmp_path / "log.txt").read_text()


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
    forward = GPT.forward
    calls = {"train": 0}

    def poisoned(self, idx, targets=None, window=None, short=None):
        loss = forward(self, idx, targets, window, short)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(GPT, "forward", poisoned)
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


def test_kernel_warmup_does_not_change_the_trajectory(tmp_path, straight_losses):
    train(tmp_path, "--max-steps", "6", "--warmup-kernel-steps", "2")
    assert losses(tmp_path) == straight_losses


def test_log_starts_with_the_source_and_environment(tmp_path):
    train(tmp_path, "--max-steps", "1")
    log = (tmp_path / "log.txt").read_text()
    assert log.index("# train_gpt.py") < log.index("# model/gpt.py") < log.index("# optim/muon.py")
    assert (ROOT / "optim" / "newton_schulz.py").read_text() in log  # the exact source, whole
    assert (ROOT / "training" / "recipe.py").read_text() in log and "# training/state.py" in log
    # the modules a run's checkpoints and log are made by are listed too
    for listed in ("training/checkpoint.py", "training/runlog.py", "data/durable.py"):
        assert f"# {listed}\n" in log, listed
    assert "torch " in log and "config {" in log
    assert log.index("# optim/muon.py") < log.index("step 0/1 val_loss")


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline run's .wandb file: a 7-byte header (":W&B", magic, version),
    then LevelDB-log records (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, parts, position, block = [], [], 7, 32768
    while position + 7 <= len(data):
        left = block - position % block
        crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length, kind) == (0, 0):  # a block's zero-filled tail
            position += left
            continue
        parts.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
            parts = []
    return records


def finished_wandb_records(run_dir: Path, timeout_s: float = 60) -> list:
    """The records once the run's `exit` record is on disk: wandb's service may still be writing the
    file when run.finish() returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"no exit record in {run_dir} after {timeout_s} s"
        time.sleep(0.2)


def wandb_history(records: list) -> dict[int, dict]:
    """{step: {metric: value}} as wandb recorded it, rows logged at one step merged."""
    rows: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            rows.setdefault(record.history.step.num, {}).update(items)
    return rows


def test_wandb_offline_logs_every_metric_as_metrics_jsonl_has_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    train(tmp_path, "--max-steps", "2", "--wandb", "--run-name", "offline-test")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    saved = finished_wandb_records(runs[0])
    history = wandb_history(saved)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records} == set(history) == {0, 1, 2}
    for record in records:
        assert {k: v for k, v in record.items() if k != "step"}.items() <= history[record["step"]].items()
    config = next(r.run.config for r in saved if r.WhichOneof("record_type") == "run")
    assert {item.key: json.loads(item.value_json) for item in config.update}["max_steps"] == 2


def test_wandb_writes_under_wandb_dir_when_it_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    train(tmp_path / "run", "--max-steps", "1", "--wandb")
    assert len(list((tmp_path / "elsewhere" / "wandb").glob("offline-run-*"))) == 1
    assert not (tmp_path / "run" / "wandb").exists()


def test_a_wandb_failure_warns_once_and_training_continues(tmp_path, monkeypatch, capsys):
    def broken_init(**kwargs):
        raise RuntimeError("not logged in")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=broken_init))
    result = train(tmp_path, "--max-steps", "2", "--wandb")
    assert result["step"] == 2
    assert capsys.readouterr().err.count("warning: wandb disabled (RuntimeError: not logged in)") == 1


def test_non_finite_weights_are_never_saved_and_the_last_finite_checkpoint_is_kept(tmp_path, monkeypatch):
    # A divergence can reach the weights before the loss: here the 3rd optimizer step leaves NaN in a
    # scalar weight, while that step's loss, computed before the step, is still finite.
    muon_step, steps = Muon.step, []

    def diverging_step(self, *args, **kwargs):
        muon_step(self, *args, **kwargs)
        steps.append(None)
        if len(steps) == 3:
            self.param_groups[-1]["params"][0].data.fill_(float("nan"))

    monkeypatch.setattr(Muon, "step", diverging_step)
    with pytest.raises(SystemExit, match="refusing to save step 3: NaN or inf in"):
        train(tmp_path, "--max-steps", "8", "--save-every", "1")
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_000002"
    assert not (checkpoints / "step_000003").exists() and not (checkpoints / "step_000003.tmp").exists()
    assert "refusing to save step 3: NaN or inf in" in (tmp_path / "log.txt").read_text()
    for name in ("shared.pt", "rank0.pt"):  # what `--resume auto` would load is finite throughout
        saved = torch.load(checkpoints / "step_000002" / name, weights_only=False)
        tensors = [t for t in pytree.tree_leaves(saved) if torch.is_tensor(t) and t.is_floating_point()]
        assert tensors and all(t.isfinite().all() for t in tensors)


def test_no_gloo_thread_survives_main_under_torchrun(gloo_pair_run):
    # A gloo thread alive after main() can abort the interpreter at exit (see init_distributed); it
    # is there or not deterministically, so this does not flake as the abort does. Each rank reports
    # to its own file: the ranks share stdout, where one rank's line can land inside the other's.
    reports = gloo_pair_run.threads
    assert [[name for name in threads if "gloo" in name] for threads in reports] == [[], []]
