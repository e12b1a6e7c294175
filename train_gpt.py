"""Train the speedrun GPT with the modular-duality (Muon) optimizer.

    python train_gpt.py                                   # CPU demo on an offline corpus (the default)
    python train_gpt.py --preset speedrun                 # 124M on FineWeb (needs `make data`)
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset speedrun

Every weight update goes through the duality map of its layer (optim/): Newton-Schulz
orthogonalization for hidden matrices, the embedding map (or Adam) for embeddings, Adam for the
LM head and scalars. The flags, presets, schedules and optimizer groups are training/recipe.py; the
run (its parts, its training step, validation and checkpoint) is training/run.py, and what it logs
training/report.py. Reads top to bottom: parse the flags, build the run, warm up, loop, finish.
"""

import copy
import dataclasses
import math
import os
import shutil
import sys
import time
from pathlib import Path

# CUDA's caching allocator grows segments in place instead of stranding memory between the
# training (48k-token) and validation (256k-token) shapes, as the record runs. Read by torch's CUDA
# allocator when it starts, so set before torch is imported; a value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# MKL's CPU GEMM may pick its code path by the operands' memory alignment, which can change from
# process to process; strict conditional numerical reproducibility fixes the path, so the same seed and
# flags give the same bits in every process and a resumed run equals an uninterrupted one. Its cost on
# the CPU demo was within noise (6 steps, 3 runs each, 2026-12-06); CUDA matmuls do not use MKL. The
# one-run-in-six last-bit difference that led here was most likely MKL's vector math instead
# (model/attention.py). Read when MKL loads; a value the user set wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

from data.shards import ShardError  # noqa: E402
from data.tokenizer import TokenizerUnavailable  # noqa: E402
from training.checkpoint import CheckpointError  # noqa: E402
from training.recipe import BatchLayout, TrainConfig, batch_layout, parse_config  # noqa: E402
from training.report import (  # noqa: E402
    Throughput,
    TimedRun,
    announce,
    log_step,
    log_summary,
    log_validation,
    run_summary,
)
from training.run import Run, open_log, samples, set_up, step_shapes  # noqa: E402
from training.rundir import claim_out_dir  # noqa: E402
from training.runtime import (  # noqa: E402
    Process,
    StopRequest,
    Stopwatch,
    agree,
    check_writable,
    close_distributed,
    init_distributed,
    keep_freed_host_memory,
    resolve_device,
    shorten_collective_timeout,
    wait_for_all_ranks,
    world_size_from_env,
)
from training.sampling import Sampling, sample  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Build the run


def main(cfg: TrainConfig) -> dict:
    """Train; returns {"val_loss", "train_time_s", "step"}. Collective under torchrun.

    What can be checked before any process group or file exists is checked first, each failure one line.
    """
    keep_freed_host_memory()
    layout = batch_layout(cfg, world_size_from_env())
    step_shapes(cfg, layout, world_size_from_env())  # every --tokens-schedule value splits, or one line
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or f"out/{cfg.preset}")
    check_writable(Path(cfg.out_dir), "--out-dir")
    check_writable(Path(cfg.out_dir) / "checkpoints", "the checkpoint folder of --out-dir")
    process = init_distributed(resolve_device(cfg.device), group_of_one=cfg.fsdp)
    try:
        return train(cfg, layout, process)
    finally:
        close_distributed()


def train(cfg: TrainConfig, layout: BatchLayout, process: Process) -> dict:
    """Set up (training/run.py: data, model, optimizer, --resume), claim --out-dir, build the Run in it,
    then warm up, loop and finish."""
    setup = set_up(cfg, layout, process)
    # Everything is checked and loaded: the run claims its folder (training/rundir.py), and only then
    # writes in it.
    with claim_out_dir(Path(cfg.out_dir), process.rank, resuming=bool(cfg.resume)):
        run = Run(cfg, process, setup, open_log(cfg, process.rank, resumed=setup.resume_from is not None))
        announce(run, setup)
        val_loss, reached_target, timed_from = warm_up_and_loop(run)
        return finish(run, val_loss, reached_target, timed_from)


# ----------------------------------------------------------------------------------------------------
# Warm up, loop


def warm_up_and_loop(run: Run) -> tuple[float, bool, TimedRun]:
    """The warm-up, then the loop: (last val_loss, target reached, where the timed run began).

    One StopRequest covers both, so SIGTERM or Ctrl-C during the warm-up (minutes of compilation) saves
    and exits as it does in the loop. The loop runs with the short collective timeout where nothing is
    left to compile (after a warm-up; on CPU without --compile on); a compiled run without warm-up keeps
    the long one. A run that runs out of memory before its first step puts its log
    files back as they were (RunLog.discard): it never started.
    """
    cfg, stop, first = run.cfg, StopRequest(), run.state.step
    warming_up = bool(cfg.warmup_kernel_steps and run.state.step < cfg.max_steps)
    try:
        if warming_up and warm_up(run, stop):
            stop_on_signal(run, stop, " during the warm-up")
            return float("nan"), False, TimedRun.starting(run)
        if warming_up or (run.process.device.type != "cuda" and cfg.compile != "on"):  # nothing to compile
            shorten_collective_timeout(cfg.collective_timeout_s)
        timed_from = TimedRun.starting(run)
        return *loop(run, stop), timed_from
    except torch.OutOfMemoryError:
        if run.state.step == first:
            run.log.discard()
        raise
    finally:
        stop.restore()


def warm_up(run: Run, stop: StopRequest) -> bool:
    """Compile and warm every graph the run uses, then put the whole state back: the timed run starts
    from exactly the state it would have had without warm-up (YaRN's rotary tables, which no state
    dict holds, are replayed by Run.follow_yarn at the next step).

    At the run's step and at the first step of each later stage of the schedule (a distinct window and
    tokens per step: Schedule.first_steps, every batch shape, window and YaRN state the run meets, as
    record #46 warms up at each of its 4 stages), --warmup-kernel-steps real steps; a validation at the
    run's step and one at --max-steps (its --final-val-windows). With the windows tensors that is one
    training graph per batch shape and one validation graph.

    Returns whether a rank was asked to stop: the ranks agree on it after each warm-up step (one
    all-reduce and one host read each, outside the timed run), and then stop warming up.
    """
    state, cfg = run.state, run.cfg
    saved, start = copy.deepcopy(state.state_dict()), state.step
    stages = [start] + [s for s in run.schedule.first_steps() if start < s < cfg.max_steps]
    t0, stopping = time.perf_counter(), False
    for stage in stages:
        for _ in range(cfg.warmup_kernel_steps):
            state.step = stage
            _, stopping = agree(run.train_step(), stop.requested)
            if stopping:
                break
        if stopping:
            break
        if stage == start:
            run.validate()
    if not stopping:
        state.step = cfg.max_steps
        run.validate()
    state.load_state_dict(saved)
    wait_for_all_ranks(run.process.device)  # the timed run starts together on every rank
    if not stopping:
        at = ", ".join(map(str, stages))
        run.log.print(f"warm-up: {cfg.warmup_kernel_steps} steps at each of steps {at} + 2 validations"
                      f" in {time.perf_counter() - t0:.1f}s (untimed, state restored)")
    return stopping


def loop(run: Run, stop: StopRequest) -> tuple[float, bool]:
    """Train from run.state.step to --max-steps, validating on schedule; (last val_loss, target reached).

    Steps run in stretches, each ending at a logged step, a validation, a checkpoint or the end
    (`stretch_ends`). Inside a stretch nothing waits for the device; at its end the clock stops on a
    device sync, and the step's loss and any rank's stop signal are read with one collective and one
    host read. The loss is checked there (Divergence): a NaN or inf loss leaves NaN in the weights, so
    the next check sees it too.
    """
    cfg, state = run.cfg, run.state
    clock, throughput = Stopwatch(run.process.device), Throughput(run)
    diverged = Divergence(state.model.config.vocab_size)
    start_step, val_loss = state.step, float("nan")
    while True:
        if validation_due(state.step, cfg):
            val_loss = run.validate()
            log_validation(run, val_loss)
            if cfg.target_val_loss and val_loss <= cfg.target_val_loss:
                run.log.print(f"target val_loss {cfg.target_val_loss} reached at step {state.step} after "
                              f"{state.train_time:.2f}s of training")
                return val_loss, True
        if state.step == cfg.max_steps:
            return val_loss, False

        first = state.step
        clock.start()
        while True:
            loss = run.train_step()
            state.step += 1
            if stretch_ends(state.step, cfg, start_step):
                break
        seconds = clock.stop()
        state.train_time += seconds
        train_loss, stopping = agree(loss, stop.requested)
        diverged(run, train_loss)
        if logged(state.step, cfg):
            log_step(run, train_loss, throughput.of(range(first, state.step), seconds))
        if stopping:
            stop_on_signal(run, stop)
            return val_loss, False
        if cfg.save_every and state.step % cfg.save_every == 0:
            run.checkpoint("periodic")
        if cfg.exit_after_steps and state.step - start_step == cfg.exit_after_steps:
            run.checkpoint(f"--exit-after-steps {cfg.exit_after_steps}")
            run.log.print(f"exiting after {cfg.exit_after_steps} steps; continue with --resume auto")
            return val_loss, False


def validation_due(step: int, cfg: TrainConfig) -> bool:
    return step == cfg.max_steps or bool(cfg.val_every and step % cfg.val_every == 0)


def logged(step: int, cfg: TrainConfig) -> bool:
    """Whether the train loss of `step` (steps done) is logged: the first of every log_every, and the last."""
    return (step - 1) % cfg.log_every == 0 or step == cfg.max_steps


def stretch_ends(step: int, cfg: TrainConfig, start_step: int) -> bool:
    """Whether the loop stops the clock after `step` steps: to log, validate, save, exit or finish."""
    saving = bool(cfg.save_every and step % cfg.save_every == 0)
    exiting = bool(cfg.exit_after_steps and step - start_step == cfg.exit_after_steps)
    return logged(step, cfg) or validation_due(step, cfg) or saving or exiting


def stop_on_signal(run: Run, stop: StopRequest, when: str = "") -> None:
    run.log.print(f"{stop.signal_name or 'stop'} received{when}: saving and exiting at step {run.state.step}")
    run.checkpoint("on signal")


class Divergence:
    """Stops a run whose train loss is NaN or inf, or has stayed above FACTOR x ln(vocabulary) at CHECKS
    reads in a row. The loop reads the loss only where it stops the clock (each logged step, and before
    a validation or a checkpoint), so the window is CHECKS reads: up to (CHECKS - 1) x --log-every + 1
    steps. ln(vocabulary), ~10.83 for GPT-2's, is the loss of a uniform guess, where every run starts
    (the LM head is zero-initialized); a loss 50% above it for that long is a divergence, not noise."""

    FACTOR, CHECKS = 1.5, 3

    def __init__(self, vocab_size: int):
        self.limit = self.FACTOR * math.log(vocab_size)
        self.above = 0  # reads in a row above the limit

    def __call__(self, run: Run, loss: float) -> None:
        if not math.isfinite(loss):
            stop_diverged(run, f"train loss is {loss}", f"non-finite train loss ({loss})")
        self.above = self.above + 1 if loss > self.limit else 0
        if self.above == self.CHECKS:
            what = (f"train loss {loss:.2f} above {self.limit:.2f} ({self.FACTOR} x ln(vocabulary), the loss "
                    f"of a uniform guess) at {self.CHECKS} reads in a row")
            stop_diverged(run, what, f"the run diverged: {what}")


def stop_diverged(run: Run, what: str, error: str) -> None:
    run.log.print(f"step {run.state.step}: {what}; stopping. The last good checkpoint is kept in "
                  f"{run.log.out_dir / 'checkpoints'} (lower the learning rates, or resume with --resume "
                  f"auto)")
    raise SystemExit(f"error: {error} at step {run.state.step}")


# ----------------------------------------------------------------------------------------------------
# Finish


def finish(run: Run, val_loss: float, reached_target: bool, timed_from: TimedRun) -> dict:
    """The summary (training/report.py), a sample and the loss plot (rank 0), and in record mode the
    record log."""
    cfg, rank, out_dir = run.cfg, run.process.rank, Path(run.cfg.out_dir)
    log_summary(run, val_loss, run_summary(run, timed_from))
    if samples(rank, cfg) and cfg.sample_tokens and run.state.step == cfg.max_steps:
        text = sample(run.state.model.eval(), cfg.sample_prompt, cfg.sample_tokens, Sampling(seed=cfg.seed))
        run.log.print("sample: " + text)
    if rank == 0 and cfg.plot:
        run.log.print(loss_plot(out_dir))
    run.log.close()
    if rank == 0 and cfg.target_val_loss:
        record = Path("records") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset}.txt"
        record.parent.mkdir(exist_ok=True)
        shutil.copyfile(out_dir / "log.txt", record)
        print(f"record log: {record} (target {'reached' if reached_target else 'NOT reached'})")
    return {"val_loss": val_loss, "train_time_s": run.state.train_time, "step": run.state.step}


def loss_plot(out_dir: Path) -> str:
    """Write out_dir/loss.png; the line saying where, or the one warning that a missing matplotlib
    costs the plot (never the run: the plot is drawn after training)."""
    from training.plot import plot_runs

    try:
        return f"loss plot: {plot_runs([out_dir], out_dir / 'loss.png')}"
    except ImportError as error:
        return f"warning: no loss plot ({error}); pip install matplotlib, or pass --no-plot"


# Errors whose message says what was wrong and how to fix it, in one line: bad data, no vocabulary,
# a checkpoint that cannot be read or written.
ONE_LINE_ERRORS = (ShardError, TokenizerUnavailable, CheckpointError)


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse the flags, train. A run that cannot start or go on ends with one line on
    stderr and exit code 1: a ONE_LINE_ERRORS error, a SystemExit carrying its message, running out of
    memory, or a collective that failed because another rank died or stopped answering."""
    try:
        main(parse_config(argv, description=__doc__))
    except ONE_LINE_ERRORS as error:
        exit_with(f"error: {error}")
    except (torch.OutOfMemoryError, MemoryError) as error:
        exit_with(f"error: {first_sentences(error, 2)}; lower --batch-size (sequences per micro-batch) or "
                  f"--seq-len")
    except RuntimeError as error:
        if not is_collective_failure(error):
            raise
        exit_with(f"error: rank {os.environ.get('RANK', 0)}: a collective failed ({first_sentences(error)}); "
                  f"another process died or stopped answering: its own output, or torchrun's report, says "
                  f"why; continue with --resume auto")
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise
        exit_with(stop.code)


def is_collective_failure(error: RuntimeError) -> bool:
    """A peer died or stopped answering: torch's DistError, a gloo error naming its source file, or gloo's
    timeout that closes the pair ("Application timeout caused pair closure", which names no file)."""
    message = str(error)
    return (isinstance(error, torch.distributed.DistError) or "/gloo/" in message
            or "timeout caused pair closure" in message)


def first_sentences(error: Exception, count: int = 1) -> str:
    """The first `count` sentences of an error's first line, without a "[file.cc:123] " source prefix."""
    line = (str(error).splitlines() or [type(error).__name__])[0]
    return ". ".join(line.split("] ", 1)[-1].split(". ")[:count])[:200]


def exit_with(line: str) -> None:
    # One write of the whole line: under torchrun every rank may say it at once on a shared stderr,
    # and the interpreter's own report of SystemExit(str) writes the message and its newline apart.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    raise SystemExit(1) from None


if __name__ == "__main__":
    cli()
