"""Host memory on CPU: a short `train_gpt.py --preset demo` run under three allocator settings, interleaved.

    python -m bench.host_memory [--steps 2] [--repeats 3]

  heap    as train_gpt.py runs: glibc keeps freed memory in its heap for the next allocation
          (training/runtime.py keep_freed_host_memory)
  mapped  glibc's defaults: each block over 32 MiB mapped afresh, its pages faulted in and zeroed by the
          kernel, and unmapped when freed
  thp     glibc's defaults, with torch's CPU allocator on transparent huge pages (THP_MEM_ALLOC_ENABLE=1,
          which train_gpt.py set until 2026-12-06)

Each run is a fresh process on the demo corpus (built at the first run, offline: set TIKTOKEN_CACHE_DIR).
Reports each run's wall, user and system seconds and peak resident memory (the child's rusage), then
per setting the median and its wall over heap's. The figures are in docs/BENCHMARKS.md.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# train_gpt.py with keep_freed_host_memory made a no-op before train_gpt imports it: glibc's defaults.
WITHOUT_HEAP = ("import runpy, sys, training.runtime as runtime; "
                "runtime.keep_freed_host_memory = lambda: False; sys.argv[0] = 'train_gpt.py'; "
                "runpy.run_path('train_gpt.py', run_name='__main__')")
SETTINGS = {
    "heap": ([str(ROOT / "train_gpt.py")], {}),
    "mapped": (["-c", WITHOUT_HEAP], {}),
    "thp": (["-c", WITHOUT_HEAP], {"THP_MEM_ALLOC_ENABLE": "1"}),
}


def run_once(setting: str, steps: int, out_dir: Path) -> dict[str, float]:
    """One demo run of `steps` steps under `setting`: wall, user, sys seconds and peak RSS in GB."""
    argv, env = SETTINGS[setting]
    flags = ["--preset", "demo", "--max-steps", str(steps), "--out-dir", str(out_dir), "--no-plot"]
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *argv, *flags], cwd=ROOT, env={**os.environ, **env},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: the {setting} run failed:\n{child.stderr.read()}")
    return dict(wall=wall, user=usage.ru_utime, sys=usage.ru_stime, rss_gb=usage.ru_maxrss / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="demo steps per run [2]")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, interleaved [3]")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in SETTINGS:
                result = run_once(name, args.steps, Path(tmp) / f"{name}{repeat}")
                results[name].append(result)
                print(f"{name:7s} run {repeat + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()),
                      flush=True)
    base = statistics.median(r["wall"] for r in results["heap"])
    print("\n| setting | wall s | user s | sys s | peak RSS GB | wall / heap |\n|---|---|---|---|---|---|")
    for name, runs in results.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {median['wall']:.2f} | {median['user']:.2f} | {median['sys']:.2f} | "
              f"{median['rss_gb']:.2f} | {median['wall'] / base:.2f}x |")


if __name__ == "__main__":
    main()
