"""README.md says what the code does: its flag table matches train_gpt.py's parser, and every command
it shows runs as written, in small form (fewer steps, smaller validation), where a CPU can run it.

Small forms append flags to the README's command (a later flag wins) or name a smaller input; each
command the suite runs elsewhere names that test, and each one a CPU cannot run says why.
"""

import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from conftest import torchrun

from training import recipe
from training.flags import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def flag_cells() -> list[str]:
    """The first cell of every row of the flag table."""
    rows = [line for line in section("Training flags").splitlines() if line.startswith("| `")]
    return [row.split(" | ")[0] for row in rows]


def listed_alternatives() -> dict[str, list[str]]:
    """{flag: values} for every `--flag a\\|b\\|c` the table writes out."""
    found = re.findall(r"(--[a-z][a-z0-9-]*) ([^\s`,]+(?:\\\|[^\s`,]+)+)", " ".join(flag_cells()))
    return {name: values.split("\\|") for name, values in found}


def test_the_flag_table_lists_every_flag_and_no_other():
    parser = build_parser(recipe.TrainConfig, recipe.PRESETS_TRAIN)
    flags = {option for action in parser._actions for option in action.option_strings}
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(flag_cells())))
    assert listed == flags - {"-h", "--help"}


def test_each_choice_flag_lists_exactly_its_choices():
    alternatives = listed_alternatives()
    for f in dataclasses.fields(recipe.TrainConfig):
        if f.metadata["choices"]:
            name = "--" + f.name.replace("_", "-")
            assert sorted(alternatives.get(name, [])) == sorted(f.metadata["choices"]), name


def test_every_value_the_table_lists_is_accepted():
    alternatives = listed_alternatives()
    assert len(alternatives) == 16  # preset model embed-map lr-scale adam-eps-form adam-state-dtype
    # step-rounding muon-state-dtype momentum-blend wd-form ns-coefficients ns-rounding device compile
    # compile-backend resume
    for name, values in alternatives.items():
        for value in values:
            if value.isupper():  # a placeholder such as PATH
                continue
            recipe.parse_config([name, value.replace("cuda:N", "cuda:0")])


# ---- every command README shows -------------------------------------------------------------------

SMALL = "--max-steps 2 --val-every 0 --val-tokens 1024 --sample-tokens 2 --no-plot"
# README command -> (what the small form appends, inputs it swaps for smaller ones); run in this order
# in one folder, with the repo on PYTHONPATH (make runs in the repo; its runs write into the folder).
RUN_HERE = {
    "python train_gpt.py --help": ("", {}),
    ".venv/bin/python train_gpt.py": (f"{SMALL} --out-dir out/venv", {}),
    "make train": (f"{SMALL} --out-dir {{work}}/out/make", {}),
    'make train ARGS="--max-steps 50 --out-dir out/try"': (f"{SMALL} --out-dir {{work}}/out/try", {}),
    "python train_gpt.py --save-every 100": (f"{SMALL} --max-steps 3 --save-every 2", {}),
    "python train_gpt.py --resume auto": (f"{SMALL} --max-steps 3", {}),
    "python train_gpt.py --exit-after-steps 500 --save-every 100":
        (f"{SMALL} --exit-after-steps 1 --save-every 1 --out-dir out/exit", {}),
    "python -m data.prepare my_corpus/ notes.txt docs.jsonl --out data/mine [--val-fraction 0.05]": ("", {}),
    "python -m data.shards check data/fineweb10B": ("", {"data/fineweb10B": "data/mine"}),
    "python train_gpt.py --data-dir data/mine": (f"{SMALL} --out-dir out/mine", {}),
    "python train_gpt.py --save-every 150 --resume auto": (f"{SMALL} --max-steps 3 --save-every 3", {}),
    'python -m tools.sample out/demo --prompt "The list" --max-tokens 60 --seed 1': ("--max-tokens 4", {}),
    "python -m tools.record_stats records/*.txt --target 3.28": ("", {}),
    "python -m bench.memory": ("--presets 124m --world-sizes 1 2 --tokens-per-gpu 1024", {}),
}
RUN_ELSEWHERE = {
    "make test": "the suite itself",
    "torchrun --standalone --nproc_per_node=2 train_gpt.py":
        "tests/test_readme.py::test_the_readme_torchrun_line_runs_with_2_processes",
    "python -m tools.hellaswag out/demo --limit 500":
        "tests/test_hellaswag.py::test_command_reports_accuracy_of_the_first_n_examples",
    "make bundle": "tests/test_bundle.py::test_bundled_train_gpt_runs_alone_with_the_repo_versions_losses",
    "python -m tools.bundle --out dist/train_gpt.py":
        "tests/test_bundle.py::test_bundled_train_gpt_runs_alone_with_the_repo_versions_losses",
    "make bench-gpu":
        "tests/test_bench_gpu.py::test_smoke_report_has_every_section_with_finite_positive_numbers",
    'make gpu-check ARGS="--out-dir DIR"':
        "tests/test_gpu_check.py::test_the_smoke_check_passes_every_check_and_writes_json_and_markdown",
    "torchrun --standalone --nproc_per_node=2 train_gpt.py --fsdp":
        "tests/test_fsdp.py::test_train_gpt_with_fsdp_follows_the_default_run_resumes_bitwise_and_samples",
}
NOT_ON_A_CPU = {
    "make install": "installs packages from the package index",
    "make data": "downloads FineWeb (~2 GB)",
    "python -m data.fineweb --train-shards 9 [--dataset fineweb10B|fineweb100B|finewebedu10B] [--dir DIR]":
        "downloads FineWeb (~2 GB)",
    "make speedrun": "8 GPUs and FineWeb",
    "python train_gpt.py --preset speedrun": "a GPU and FineWeb",
    "torchrun --standalone --nproc_per_node=8 train_gpt.py --preset speedrun": "8 GPUs and FineWeb",
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=run1 "
    "train_gpt.py --preset speedrun": "2 nodes of 8 GPUs",
    "torchrun --standalone --nproc_per_node=8 train_gpt.py --preset speedrun-2025-07-12 --model 350m --fsdp":
        "8 GPUs and FineWeb",
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=run2 "
    "train_gpt.py --preset speedrun-2025-07-12 --model 1.5b --fsdp --seq-len 8192 --val-seq-len 65536":
        "2 nodes of 8 GPUs",
}


def readme_commands() -> set[str]:
    """Each line of the README's bash blocks (comments cut, continued lines joined) and each inline
    `python ...`, `make ...` or `torchrun ...`."""
    commands = set()
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line)
            commands.add(" ".join(command.split()))
    commands |= set(re.findall(r"`((?:\.venv/bin/)?python [^`]+|make [^`]+|torchrun [^`]+)`", README))
    return commands - {""}


def test_every_readme_command_is_run_here_run_elsewhere_or_said_to_need_more_than_a_cpu():
    assert readme_commands() == set(RUN_HERE) | set(RUN_ELSEWHERE) | set(NOT_ON_A_CPU)
    for where in RUN_ELSEWHERE.values():
        path, _, name = where.partition("::")
        assert not name or f"def {name}(" in (ROOT / path).read_text(), where


def small_form(command: str, work: Path) -> list[str]:
    """The README command as argv: optional [...] parts dropped, its inputs swapped, flags appended."""
    extra, swaps = RUN_HERE[command]
    for old, new in swaps.items():
        command = command.replace(old, new)
    argv = shlex.split(re.sub(r" \[[^]]*\]", "", command))
    extra = shlex.split(extra.format(work=work))
    if argv[0] == "make":
        args = next((a for a in argv if a.startswith("ARGS=")), "ARGS=")
        argv = [a for a in argv if a != args]
        # -o: take the .venv as installed (its stamp older than requirements.txt must not reinstall)
        return ["make", "-C", str(ROOT), "-o", ".venv/.installed", *argv[1:], " ".join([args, *extra])]
    python = {"python": [sys.executable], ".venv/bin/python": [sys.executable]}[argv[0]]
    args = [str(ROOT / a) if a == "train_gpt.py" else a for a in argv[1:]]
    expanded = [match for a in args for match in (sorted(glob.glob(str(work / a))) if "*" in a else [a])]
    return [*python, *expanded, *extra]


def corpus(work: Path) -> None:
    """The inputs README's data.prepare line names, from CPython's longest documentation topics: the
    first document (the validation split's) is long enough for a small validation."""
    texts = [text for _, text in sorted(((len(t), t) for t in topics.values()), reverse=True)[:22]]
    (work / "my_corpus").mkdir()
    for i, text in enumerate(texts[:18]):
        (work / "my_corpus" / f"{i:02d}.txt").write_text(text)
    (work / "notes.txt").write_text(texts[18])
    (work / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[19:]))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    corpus(work)
    return work


@pytest.mark.parametrize("command", list(RUN_HERE))
def test_the_readme_command_runs_in_small_form(command, work):
    if "records/" in command:  # record-mode logs: those of two earlier small runs
        (work / "records").mkdir(exist_ok=True)
        for run in ("venv", "mine"):
            shutil.copyfile(work / "out" / run / "log.txt", work / "records" / f"{run}.txt")
    done = subprocess.run(small_form(command, work), cwd=work, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr


# ---- the torchrun line with 2 and 3 processes ------------------------------------------------------

TORCHRUN_SMALL = ["--max-steps", "2", "--val-every", "0", "--sample-tokens", "0", "--no-plot"]


def test_the_readme_torchrun_line_runs_with_2_processes(gloo_pair_run):
    out = gloo_pair_run.stdout  # conftest's run of the line with 2 processes, 4 steps
    assert "1,024 tokens/step = 2 process(es) x 4 sequences x 128 tokens x 1 micro-batch(es)" in out
    assert "done: step 4/4" in out


def test_the_readme_torchrun_line_with_3_processes_names_the_flags_that_fit(tmp_path):
    refused = torchrun(3, "train_gpt.py", *TORCHRUN_SMALL, "--out-dir", str(tmp_path))
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("error: ")]
    # One line from each rank that gets to say it before torchrun stops the others; no process group.
    assert refused.returncode != 0 and 1 <= len(lines) <= 3 and len(set(lines)) == 1
    assert lines[0].startswith("error: --tokens-per-step 1024 is not a multiple of 3 processes x --seq-len")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    fits = lines[0].split("; try ")[1].split()
    assert fits == ["--tokens-per-step", "1152", "--val-tokens", "8064"]
    done = torchrun(3, "train_gpt.py", *TORCHRUN_SMALL, *fits, "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: step 2/2" in done.stdout
