"""A run's record: console lines, a human-readable log file and a metrics.jsonl, written by rank 0 only.

metrics.jsonl holds one JSON object per line: training steps carry `step` and `train_loss` (plus lr,
step_ms, tokens_per_s, ...), validations carry `step` and `val_loss`. Both files are flushed every
line, so a crashed run keeps everything it logged.
"""

import json
import math
from pathlib import Path


class RunLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._text = open(self.out_dir / "log.txt", "w", encoding="utf-8")  # noqa: SIM115 -- lives with the run
        self._metrics = open(self.out_dir / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115

    def print(self, line: str = "", console: bool = True) -> None:
        """One line to the log file, and to the console unless console=False."""
        if not self.enabled:
            return
        if console:
            print(line, flush=True)
        self._text.write(line + "\n")
        self._text.flush()

    def metrics(self, **values) -> None:
        """One metrics.jsonl record; floats are rounded to 6 significant digits, NaN/inf kept as strings."""
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in values.items()}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        if self.enabled:
            self._text.close()
            self._metrics.close()


def _jsonable(value):
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    return value
