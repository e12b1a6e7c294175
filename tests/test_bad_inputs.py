"""docs/BAD_INPUTS.md, row by row: each bad input ends with its documented exit code and one line that
says what was wrong, no traceback, no hang, and nothing lost.

Rows run in this process through train_gpt.cli, the function the script's __main__ calls: it writes
its line to stderr and raises SystemExit with the exit code; any other exception escaping cli() would
be a traceback, and fails the test. Two rows also run as real processes, to pin that equivalence.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import train_gpt
from data.shards import fingerprint, write_shard
from model import GPT
from training import plot
from training.run import Run
from training.rundir import LOCK, claim_out_dir

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BAD_INPUTS.md"
# Added to the rows that go on to train (exit 0), so that they train one short step.
FAST = ["--max-steps", "1", "--val-every", "0", "--val-tokens", "1024", "--sample-tokens", "0", "--no-plot"]
TIME_LIMIT_S = 120  # a row that takes longer hangs; each takes well under 10 s (one trains a step)


@dataclass(frozen=True)
class Row:
    args: tuple[str, ...]
    exit: int
    says: tuple[str, ...]  # fragments the line holds, in order
    checked: str

    def __str__(self) -> str:
        return " ".join(self.args)


def table_rows() -> list[Row]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 4 or not cells[1].isdigit():
            continue
        command = re.match(r"`([^`]*)`", cells[0])
        args = tuple(shlex.split(command.group(1))) if command else ()
        rows.append(Row(args, int(cells[1]), tuple(re.findall(r"`([^`]*)`", cells[2])), cells[3]))
    return rows


ROWS = table_rows()


# ---- the places the rows name ----------------------------------------------------------------------


def earlier_run(folder: Path) -> Path:
    """A run folder as an earlier run leaves it: its log, its metrics, a checkpoints/ folder."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "log.txt").write_text("the earlier run's log\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    return folder


@contextmanager
def unwritable(folder: Path):
    """`folder` made unwritable for this process: chmod, or for root (whom permissions do not stop)
    the immutable attribute. Skips where neither works."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield
        folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
        pytest.skip("root here cannot make a folder unwritable (no chattr +i on this filesystem)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder holding the demo model's checkpoint at step 2 (and its log)."""
    folder = tmp_path_factory.mktemp("trained")
    train_gpt.main(train_gpt.parse_config(["--out-dir", str(folder), "--max-steps", "3", "--exit-after-steps",
                                           "2", *FAST[2:]]))
    return folder


def copy_of(trained: Path, folder: Path) -> Path:
    """A copy of the trained run, its big files hard links (a corruption replaces a file, never edits it)."""
    shutil.copytree(trained, folder, copy_function=os.link)
    return folder


def replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def build(name: str, tmp_path: Path, request) -> Path:
    """The place a row's placeholder names, made in tmp_path."""
    place = tmp_path / name.lower()
    if name in ("RUN", "LOCKED_RUN"):
        return earlier_run(place)
    if name == "A_FILE":
        place.write_text("a file, not a folder\n")
    elif name == "READ_ONLY":
        place.mkdir()
    elif name == "OTHER_SHARDS":
        place.mkdir()
        for split in ("val", "train"):
            write_shard(place / f"other_{split}_000000.bin", [(7 * i) % 50000 for i in range(20000)])
    elif name == "IN_USE":
        earlier_run(place)
        (place / LOCK).write_text(f"1 {socket.gethostname()}\n")  # pid 1 lives as long as the machine
    elif name == "TRUNCATED_SHARDS":
        place.mkdir()
        write_shard(place / "x_val_000000.bin", list(range(2048)))
        shard = write_shard(place / "x_train_000000.bin", list(range(2048)))
        shard.write_bytes(shard.read_bytes()[:-10])
    elif name in ("TRAINED", "TRUNCATED_SHARED", "GARBAGE_RANK0", "DANGLING_LATEST"):
        copy_of(request.getfixturevalue("trained"), place)
        step = place / "checkpoints" / "step_000002"
        if name == "TRUNCATED_SHARED":
            replace(step / "shared.pt", (step / "shared.pt").read_bytes()[:4096])
        elif name == "GARBAGE_RANK0":
            replace(step / "rank0.pt", b"not a checkpoint")
        elif name == "DANGLING_LATEST":
            shutil.rmtree(step)
    return place  # NEW and NOWHERE: paths that do not exist


PLACEHOLDER = re.compile(r"\b(RUN|LOCKED_RUN|IN_USE|OTHER_SHARDS|NEW|NOWHERE|A_FILE|READ_ONLY|"
                         r"TRUNCATED_SHARDS|TRAINED|TRUNCATED_SHARED|GARBAGE_RANK0|DANGLING_LATEST)\b")


def resolve(row: Row, tmp_path: Path, request) -> tuple[list[str], tuple[str, ...], dict[str, Path]]:
    """The row's arguments and fragments with its placeholders made real, and the places made."""
    args = list(row.args) if "--out-dir" in row.args else [*row.args, "--out-dir", "RUN"]
    names = sorted({m for text in (*args, *row.says) for m in PLACEHOLDER.findall(text)})
    places = {name: build(name, tmp_path, request) for name in names}

    def real(text: str) -> str:
        return PLACEHOLDER.sub(lambda m: str(places[m.group(1)]), text)

    return [real(a) for a in args], tuple(real(s) for s in row.says), places


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file at or under root: its bytes if small, else its size and modification time."""
    files = {}
    for path in [root, *sorted(root.rglob("*"))]:
        if path.is_file():
            stat = path.stat()
            files[str(path.relative_to(root))] = (path.read_bytes(),) if stat.st_size < 2**20 else (
                stat.st_size, stat.st_mtime_ns)
    return files


@contextmanager
def time_limit(seconds: float):
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the script given args."""
    code = 0
    capsys.readouterr()  # what fixtures printed
    with time_limit(TIME_LIMIT_S):
        try:
            train_gpt.cli(args)
        except SystemExit as stop:
            code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_row(row: Row, tmp_path: Path, request, capsys) -> None:
    args, says, places = resolve(row, tmp_path, request)
    protected = {name: snapshot(place) for name, place in places.items() if place.exists()}
    with ExitStack() as locks:
        for folder in (places.get("READ_ONLY"), places.get("LOCKED_RUN", tmp_path / "-") / "checkpoints"):
            if folder is not None and folder.exists():
                locks.enter_context(unwritable(folder))
        code, out, err = run_cli(args + (FAST if row.exit == 0 else []), capsys)
    assert code == row.exit, err[-2000:]
    lines = [line for line in (out if row.exit == 0 else err).splitlines() if all(s in line for s in says)]
    assert lines, f"no line holds {says}:\n{out}{err}"
    assert re.search(".*".join(map(re.escape, says)), lines[0]), f"not in this order: {says}"
    if row.exit:
        assert out == "" and err.count("\n") == 1, f"more than one line:\n{out}{err}"
    assert "Traceback" not in out + err
    for name, before in protected.items():
        assert snapshot(places[name]) == before, f"{name} changed"


@pytest.mark.parametrize("row", [r for r in ROWS if r.checked == "cpu"], ids=str)
def test_a_bad_input_ends_as_documented(row, tmp_path, request, capsys):
    check_row(row, tmp_path, request, capsys)


def test_the_table_lists_at_least_twenty_bad_inputs_each_checked():
    assert len(ROWS) >= 20
    for row in ROWS:
        if row.checked != "cpu":
            path, _, name = row.checked.partition("::")
            assert f"def {name}(" in (ROOT / path).read_text(), row.checked


@pytest.mark.parametrize("args, code, line", [
    (["--compile", "yes"], 2, "train_gpt.py: error: argument --compile: expected one of auto, on, off"),
    (["--tokens-per-step", "1000"], 1, "error: --tokens-per-step 1000 is not a multiple of 1 process"),
])
def test_as_a_process_a_bad_input_is_one_line_on_stderr_and_its_exit_code(tmp_path, args, code, line):
    done = subprocess.run([sys.executable, "train_gpt.py", *args, "--out-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIME_LIMIT_S)
    assert (done.returncode, done.stdout) == (code, "")
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(line)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_one_process_checkpoint_resumed_by_two_ranks_is_refused_on_one_line(trained, tmp_path):
    run = copy_of(trained, tmp_path / "run")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, "train_gpt.py", "--out-dir", str(run), "--resume", "auto", *FAST[2:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIME_LIMIT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert 'train_gpt.py", line' not in output  # torchrun's own traceback is its report, not ours
    lines = [line for line in output.splitlines() if "written by 1 process, this run has 2" in line]
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1  # torchrun may stop a rank before it says it


# ---- the run folder: one live run, nothing of an earlier run lost (training/rundir.py) ---------------


def test_a_second_live_run_into_the_folder_is_refused_naming_the_first_ones_pid(tmp_path):
    with claim_out_dir(tmp_path, rank=0, resuming=True):
        with pytest.raises(SystemExit, match=f"is in use by process {os.getpid()} on {socket.gethostname()}"):
            with claim_out_dir(tmp_path, rank=0, resuming=True):
                pass
        assert (tmp_path / LOCK).is_file()  # the refusal left the first run's lock alone
    assert not (tmp_path / LOCK).exists()  # removed when the run ends


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / LOCK).write_text(f"{gone} {socket.gethostname()}\n")
    with claim_out_dir(tmp_path, rank=0, resuming=True):
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())


def test_a_resume_removes_the_unfinished_saves_that_hold_the_disk(trained, tmp_path):
    run = copy_of(trained, tmp_path / "run")
    unfinished = run / "checkpoints" / "step_000003.tmp"
    unfinished.mkdir()
    (unfinished / "rank0.pt").write_bytes(b"x" * 1000)
    with claim_out_dir(run, rank=0, resuming=True):
        assert not unfinished.exists()
    assert (run / "checkpoints" / "step_000002" / "shared.pt").is_file()


def test_a_finished_run_leaves_no_lock(trained):
    assert not (trained / LOCK).exists() and (trained / "log.txt").is_file()


# ---- faults while a run starts or goes on: one line, nothing lost --------------------------------------

CUDA_OOM = ("CUDA out of memory. Tried to allocate 24.00 GiB. GPU 0 has a total capacity of 79.19 GiB of "
            "which 3.10 GiB is free.")


def test_out_of_memory_at_the_first_step_is_one_line_and_leaves_the_logs_as_they_were(trained, tmp_path,
                                                                                     monkeypatch, capsys):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(GPT, "forward", out_of_memory)
    resumed, new = copy_of(trained, tmp_path / "resumed"), tmp_path / "new"
    before = snapshot(resumed)
    for args in (["--out-dir", str(resumed), "--resume", "auto", "--max-steps", "3"],
                 ["--out-dir", str(new)]):
        code, out, err = run_cli([*args, *FAST[2:]], capsys)
        assert (code, err) == (1, "error: CUDA out of memory. Tried to allocate 24.00 GiB; lower "
                                  "--batch-size (sequences per micro-batch) or --seq-len\n")
    assert snapshot(resumed) == before  # the resumed run's log lines are taken back too
    assert list(new.iterdir()) == []  # no log, no metrics, no lock: the run never started


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_warm_up_saves_and_exits_as_in_the_loop(tmp_path, monkeypatch, capsys, signum):
    real_step = Run.train_step

    def signalled_step(run):
        os.kill(os.getpid(), signum)  # as if sent while the first warm-up step compiles
        return real_step(run)

    monkeypatch.setattr(Run, "train_step", signalled_step)
    code, out, err = run_cli(["--out-dir", str(tmp_path), "--warmup-kernel-steps", "3", *FAST], capsys)
    name = signal.Signals(signum).name
    assert (code, err) == (0, "")
    assert f"{name} received during the warm-up: saving and exiting at step 0" in out.splitlines()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000000"


def test_a_cut_off_or_binary_metrics_line_is_skipped_with_one_warning(tmp_path, capsys):
    good = ['{"step": 1, "train_loss": 10.8}', '{"step": 2, "val_loss": 10.5, "train_time_s": 1.0}']
    cut_off, binary = b'{"step": 3, "train_lo', b"\xff\xfe\x00"
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join([*map(str.encode, good), cut_off, binary]) + b"\n")
    assert plot.read_metrics(tmp_path) == [json.loads(line) for line in good]
    assert capsys.readouterr().err == (f"warning: {tmp_path / 'metrics.jsonl'}:3: not a metrics record (cut "
                                       f"off?); skipped it and 1 other line(s) like it\n")


def test_a_missing_matplotlib_costs_the_plot_with_one_warning_not_the_run(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 10.8}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    line = train_gpt.loss_plot(tmp_path)
    assert line.startswith("warning: no loss plot (")
    assert line.endswith("pip install matplotlib, or pass --no-plot")
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("target", ["gpu-check", "bench-gpu"])
def test_the_gpu_make_targets_without_torch_say_so_in_one_line(tmp_path, target):
    python = tmp_path / "python3"  # a python without site-packages: no torch
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    python.chmod(0o755)
    done = subprocess.run(["make", "-s", "-C", str(ROOT), target, f"BENCH_PY={python}"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines()[0] == (f"error: {python} cannot import torch: run `make install` (or pip "
                                           f"install -r requirements.txt) first")


def test_a_checkpoint_records_how_many_processes_wrote_it(trained):
    shared = torch.load(trained / "checkpoints" / "step_000002" / "shared.pt", weights_only=False)
    assert shared["world_size"] == 1


# ---- a resume continues the checkpoint's plan -------------------------------------------------------


def test_a_resume_with_resume_changed_ok_goes_on_and_logs_each_change(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path / "run")
    code, out, err = run_cli(["--out-dir", str(run), "--resume", "auto", "--max-steps", "3", "--lr", "0.04",
                              "--resume-changed-ok", *FAST[2:]], capsys)
    assert (code, err) == (0, "")
    line = (f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2, with --resume-changed-ok: "
            f"--lr 0.05 -> 0.04")
    assert line in out.splitlines() and line in (run / "log.txt").read_text()


def test_the_shards_fingerprint_changes_with_their_tokens_not_with_their_folder(tmp_path):
    paths = [write_shard(tmp_path / name, list(range(1000))) for name in ("a_train_000000.bin", "b.bin")]
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(paths[0], copy / paths[0].name)
    assert fingerprint([paths[0]]) == fingerprint([copy / paths[0].name])
    write_shard(copy / paths[0].name, [*range(999), 5])  # re-prepared: same name and size, one token apart
    assert fingerprint([paths[0]]) != fingerprint([copy / paths[0].name])
    assert fingerprint(paths) != fingerprint(paths[:1])


# ---- divergence is not success ------------------------------------------------------------------------


def test_a_loss_far_above_the_start_for_three_reads_stops_the_run_but_a_shorter_spike_does_not(
        tmp_path, monkeypatch, capsys):
    # Training forwards 1-2 and 4-8 return 3x the loss (~30, above 1.5 x ln(50304) = 16.24): the
    # spike at steps 1-2 is two reads, then step 3 is normal; steps 4, 5, 6 are three reads in a row.
    forward, calls = GPT.forward, []

    def spiking(self, idx, targets=None, window=None, short=None):
        loss = forward(self, idx, targets, window, short)
        if self.training:
            calls.append(None)
            return loss * 3 if len(calls) != 3 else loss
        return loss

    monkeypatch.setattr(GPT, "forward", spiking)
    flags = ["--out-dir", str(tmp_path), *FAST, "--max-steps", "8", "--log-every", "1"]
    code, out, err = run_cli(flags, capsys)
    assert code == 1 and len(calls) == 6
    assert re.fullmatch(r"error: the run diverged: train loss \d\d\.\d\d above 16\.24 \(1\.5 x "
                        r"ln\(vocabulary\), the loss of a uniform guess\) at 3 reads in a row at step 6\n",
                        err), err


# ---- no silent hang -------------------------------------------------------------------------------


def test_torchrun_variables_left_in_the_environment_without_torchrun_are_one_line(tmp_path, monkeypatch,
                                                                                 capsys):
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    code, out, err = run_cli(["--out-dir", str(tmp_path / "run")], capsys)
    assert (code, out) == (1, "")
    assert err == ("error: WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 set, but torchrun did not "
                   "start this process (no LOCAL_RANK): unset them to run one process, or launch with "
                   "torchrun\n")


@pytest.mark.parametrize("message, one_line", [
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1", True),
    ("Application timeout caused pair closure", True),  # gloo's other timeout names no source file
    ("mat1 and mat2 shapes cannot be multiplied", False)])  # a bug stays a traceback
def test_which_runtime_errors_are_a_failed_collective(monkeypatch, capsys, message, one_line):
    def failing_main(config):
        raise RuntimeError(message)

    monkeypatch.setattr(train_gpt, "main", failing_main)
    if not one_line:
        with pytest.raises(RuntimeError, match="shapes"):
            train_gpt.cli([])
        return
    code, out, err = run_cli([], capsys)
    assert code == 1 and err.startswith("error: rank 0: a collective failed (") and err.count("\n") == 1


# Rank 1 of two gloo processes dies (kill -9) or stops (SIGSTOP) at its 4th step; the ranks are started
# as torchrun starts them (its environment variables), so the test controls both processes' ends.
FAULTY_RANK = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train_gpt
from training.run import Run

real_step = Run.train_step


def faulty_step(run):
    if os.environ["RANK"] == "1" and run.state.step == 3:
        if {fault!r} == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(9)
    return real_step(run)


Run.train_step = faulty_step
train_gpt.cli(sys.argv[1:])
"""


# A stopped peer reaches rank 0 as either of gloo's two timeouts, depending on which wait expires first.
@pytest.mark.parametrize("fault, says", [("kill", ("Connection closed by peer",)),
                                         ("stop", ("Timed out waiting 10000ms",
                                                   "Application timeout caused pair closure"))])
def test_a_peer_that_dies_or_stops_answering_is_one_line_from_the_other_rank(tmp_path, fault, says):
    script = tmp_path / "faulty_rank.py"
    script.write_text(FAULTY_RANK.format(root=str(ROOT), fault=fault))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    flags = ["--out-dir", str(tmp_path / "run"), *FAST[2:], "--max-steps", "8", "--log-every", "1",
             "--batch-size", "4", "--collective-timeout-s", "10"]  # 3 s was too tight on a slow machine
    job = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(script), *flags], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **job, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    try:
        out, err = ranks[0].communicate(timeout=TIME_LIMIT_S)  # 10 s after rank 1 stops, not 30 minutes
    finally:
        ranks[1].kill()
        _, rank1_err = ranks[1].communicate()
    assert ranks[0].returncode == 1 and "step 3/8 train_loss" in out, f"{err}\nrank 1:\n{rank1_err[-3000:]}"
    assert err.count("\n") == 1 and err.startswith("error: rank 0: a collective failed (")
    assert any(message in err for message in says), err
    assert err.rstrip().endswith("another process died or stopped answering: its own output, or torchrun's "
                                 "report, says why; continue with --resume auto")
