"""A run's record, written by rank 0 only: console lines, log.txt, metrics.jsonl and (opt-in) wandb.

log.txt begins with the exact source of every repo module the run imported and the environment
(Python, torch, CUDA, GPUs, nvidia-smi), so a run can be reproduced from its log alone. metrics.jsonl
holds one JSON object per line: training steps carry `step` and `train_loss` (plus lr, step_ms,
tokens_per_s, mfu, ...), validations carry `step` and `val_loss`. Both files are flushed every line,
so a crashed run keeps everything it logged; a resumed run appends to them.
"""

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("model", "optim", "data", "training", "tools")  # tools: a run started from a command

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card's 756e12 is matched first below
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPU, unlisted GPUs): MFU is then not shown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def source_modules() -> list[Path]:
    """The entry script and every repo module of SOURCE_PACKAGES imported so far, the entry first."""
    entry = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0].endswith(".py") else None
    paths = {entry} if entry and entry.is_file() else set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file or not Path(file).is_absolute() or not Path(file).is_file():
            continue
        path = Path(file).resolve()
        if path.is_relative_to(REPO):
            relative = path.relative_to(REPO)
            if relative.parts[0] in SOURCE_PACKAGES or relative == Path("train_gpt.py"):
                paths.add(path)
    return sorted(paths, key=lambda p: (p.name != "train_gpt.py", str(p)))


def code_listing() -> str:
    parts = []
    for path in source_modules():
        name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        parts.append(f"{'=' * 100}\n# {name}\n{'=' * 100}\n{path.read_text()}")
    return "\n".join(parts)


def environment() -> str:
    lines = [f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}, platform {platform.platform()}"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"GPUs: {', '.join(names)}")
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
            lines.append(smi.rstrip())
        except (OSError, subprocess.TimeoutExpired) as error:
            lines.append(f"nvidia-smi: not available ({error})")
    return "\n".join(lines)


class WandbSink:
    """wandb on rank 0; imported lazily. Any failure (not installed, not logged in, network down)
    prints one warning and turns the sink off: logging must never stop training.
    WANDB_MODE=offline|disabled and WANDB_DIR are honoured."""

    def __init__(self, project: str, run_name: str | None, config: dict, out_dir: Path):
        self.run = None
        try:
            import wandb

            # WANDB_DIR, when set, says where wandb writes; otherwise the run's folder does.
            where = os.environ.get("WANDB_DIR") or str(out_dir)
            self.run = wandb.init(project=project, name=run_name, config=config, dir=where)
        except Exception as error:  # noqa: BLE001 -- any wandb failure must leave training running
            print(f"warning: wandb disabled ({type(error).__name__}: {error}); logging locally only",
                  file=sys.stderr, flush=True)

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            values = {k: v for k, v in record.items() if k != "step"}
            self.run.log(values, step=record["step"])
        except Exception as error:  # noqa: BLE001
            print(f"warning: wandb logging failed ({error}); continuing without it", file=sys.stderr)
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as error:  # noqa: BLE001
                print(f"warning: wandb finish failed ({error})", file=sys.stderr)


class RunLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True, append: bool = False,
                 wandb: WandbSink | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.wandb = wandb
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        # Each file's size before this run, which discard() puts back (None: the run creates the file).
        paths = {name: self.out_dir / name for name in ("log.txt", "metrics.jsonl")}
        self._found = {name: path.stat().st_size if append and path.exists() else None
                       for name, path in paths.items()}
        self._text = open(self.out_dir / "log.txt", mode, encoding="utf-8")  # noqa: SIM115 -- lives with the run
        self._metrics = open(self.out_dir / "metrics.jsonl", mode, encoding="utf-8")  # noqa: SIM115

    def print(self, line: str = "", console: bool = True) -> None:
        """One line to the log file, and to the console unless console=False."""
        if not self.enabled:
            return
        if console:
            print(line, flush=True)
        self._text.write(line + "\n")
        self._text.flush()

    def metrics(self, **values) -> None:
        """One metrics.jsonl record (and wandb row); floats at full precision, NaN/inf as strings."""
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in values.items()}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            self.wandb.log(record)

    def discard(self) -> None:
        """Close the files and undo this run's writes to them: each back to its size when opened, or
        deleted if this run created it. For a run that stops before its first step."""
        if not self.enabled:
            return
        self._text.close()
        self._metrics.close()
        for name, size in self._found.items():
            if size is None:
                (self.out_dir / name).unlink(missing_ok=True)
            else:
                os.truncate(self.out_dir / name, size)

    def close(self) -> None:
        if self.enabled:
            self._text.close()
            self._metrics.close()
            if self.wandb is not None:
                self.wandb.finish()


def _jsonable(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value
