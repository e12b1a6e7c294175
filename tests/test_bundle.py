"""tools.bundle: one file, no repo imports, one namespace where a name means one thing; the bundled
train_gpt.py trains bitwise like the repo's."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools import bundle
from tools.bundle import BundleError, Bundler

ROOT = Path(__file__).resolve().parents[1]
FAKE_REPO = {
    "pkg/__init__.py": '''
        """A package that re-exports."""
        from .core import Scale, helper

        __all__ = ["helper", "Scale"]
        ''',
    "pkg/core.py": '''
        from pathlib import Path

        HERE = Path(__file__).resolve().parent


        def helper(x):
            return _twice(x) + 1


        def _twice(x):
            return 2 * x


        class Scale:
            factor = 3


        def unused():
            return "never inlined"


        def main():
            print("core main")


        if __name__ == "__main__":
            main()
        ''',
    "pkg/other.py": '''
        from pathlib import Path  # the same external object as core's Path: one name, one thing


        def offset():
            return len(Path("ab").name) * 50 + 2


        def main():  # another main than the entry's, but never used: left out, so no collision
            print("other main")
        ''',
    "pkg/lazy.py": '''
        from pkg.other import offset


        def late_value():
            return offset() * 2
        ''',
    "main.py": '''
        """The entry script."""
        import sys

        from pkg import Scale, helper
        from pkg.other import offset


        def folder_name():
            from pkg.core import HERE

            return HERE.name


        def in_a_block():
            if sys.argv:
                from pkg.core import helper
            return helper(0)


        def main():
            from pkg.lazy import late_value

            print(helper(2), Scale.factor, offset(), late_value(), folder_name(), in_a_block())


        if __name__ == "__main__":
            main()
        ''',
}


def write_repo(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root / "main.py"


def run_alone(bundle_text: str, folder: Path, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """Run the bundle as the only file of an empty folder, with no PYTHONPATH to find the repo by."""
    folder.mkdir()
    (folder / "train_gpt.py").write_text(bundle_text)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "train_gpt.py", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


def repo_modules(root: Path) -> set[str]:
    """The top-level names a repo import can start with: every package and .py file at the root."""
    return {p.parent.name for p in root.glob("*/__init__.py")} | {p.stem for p in root.glob("*.py")}


def repo_imports(text: str, packages: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.level or node.module.split(".")[0] in packages):
            found.append(f"line {node.lineno}: from {node.module}")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in packages]
    return found


def test_fake_repo_bundle_runs_alone_and_prints_what_the_repo_prints(tmp_path):
    entry = write_repo(tmp_path / "repo", FAKE_REPO)
    in_repo = subprocess.run([sys.executable, "main.py"], cwd=entry.parent, capture_output=True, text=True)
    # helper(2) = 5, Scale.factor 3, offset() 102, late_value() 204, __file__'s folder "pkg", helper(0) = 1
    assert in_repo.stdout == "5 3 102 204 pkg 1\n"
    bundler = Bundler(entry)
    text = bundler.run()
    alone = run_alone(text, tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout == in_repo.stdout
    assert bundler.inlined == ["pkg/__init__.py", "pkg/core.py", "pkg/other.py", "pkg/lazy.py"]
    assert repo_imports(text, repo_modules(entry.parent)) == []


def test_unused_definitions_and_main_blocks_are_left_out(tmp_path):
    text = Bundler(write_repo(tmp_path, FAKE_REPO)).run()
    assert "never inlined" not in text and "core main" not in text and "other main" not in text
    assert "__all__ =" not in text
    assert "# left out (unused here): main, unused" in text
    assert text.count("def main():") == 1  # the entry's
    assert "    if sys.argv:\n        pass\n" in text  # the block whose only statement was a repo import


def test_names_keep_their_spelling(tmp_path):
    """One namespace without renaming: every kept definition reads as it does in its module."""
    text = Bundler(write_repo(tmp_path, FAKE_REPO)).run()
    assert "return _twice(x) + 1" in text and "def offset():" in text
    assert "print(helper(2), Scale.factor, offset()," in text
    assert "return HERE.name" in text


@pytest.mark.parametrize("files, message", [
    ({"main.py": "from a import f\nfrom b import g\nprint(f(), g())\n",
      "a.py": "def f():\n    return _h()\n\n\ndef _h():\n    return 1\n",
      "b.py": "def g():\n    return _h()\n\n\ndef _h():\n    return 2\n"},
     "`_h` is defined at a.py:5 and defined at b.py:5, but the bundle is one namespace"),
    ({"main.py": "from a import f\nf()\n\n\ndef f():\n    pass\n", "a.py": "def f():\n    pass\n"},
     "`f` is defined at main.py:5 and defined at a.py:1"),
    ({"main.py": "from a import f\nprint(f)\n", "a.py": "from b import g\nf = 1\ng = 2\nprint(g)\n",
      "b.py": "g = 3\n"},
     "`g` is defined at a.py:3 and defined at b.py:1"),
    ({"main.py": "import os as np\nfrom a import f\nprint(np, f)\n", "a.py": "import numpy as np\nf = np\n"},
     "`np` is imported at main.py:1 and imported at a.py:1"),
    ({"main.py": "from a import f\nprint(f(), open)\n", "a.py": "def open():\n    pass\n\n\nf = open\n"},
     "`open` is read as the builtin in main.py and defined at a.py:1"),
    ({"main.py": "from a import f\nprint(f)\n",
      "a.py": "def _inlined_file():\n    pass\n\n\nf = _inlined_file\n"},
     "`_inlined_file` is reserved by the bundle and defined at a.py:1"),
    ({"main.py": "from a import y as z\nprint(z)\n", "a.py": "y = 1\n"},
     "main.py:1: `y as z` gives a repo name a second name"),
    ({"main.py": "import pkg\n", "pkg/__init__.py": ""}, "main.py:1: `import pkg` binds a module object"),
    ({"main.py": "from pkg import core\n", "pkg/__init__.py": "", "pkg/core.py": ""},
     "main.py:1: `core` is a module object"),
    ({"main.py": "from pkg import *\n", "pkg/__init__.py": ""}, "main.py:1: `from pkg import *`"),
    ({"main.py": "from a import y\n", "a.py": "from b import x\ny = x\n", "b.py": "from a import y\nx = y\n"},
     "b.py:1: import cycle through a.py"),
    ({"main.py": "from a import y\n", "a.py": "from __future__ import annotations\ny = 1\n"},
     "a.py:1: `from __future__ import` in an inlined module"),
    ({"main.py": "from a import y\n", "a.py": "class C:\n    from b import x\ny = C\n", "b.py": "x = 1\n"},
     "a.py:2: a repo import inside a class body"),
    ({"main.py": "import os; from a import y\n", "a.py": "y = 1\n"},
     "main.py:1: put each top-level statement on lines of its own"),
    ({"main.py": "def f():\n    x = 1; from a import y\n", "a.py": "y = 1\n"},
     "main.py:2: put this repo import on lines of its own"),
], ids=["two-modules-one-name", "entry-and-module", "import-and-own-code", "different-externals",
        "builtin-redefined", "reserved-helper", "import-as", "import-module", "submodule", "star", "cycle",
        "future", "class-body", "statements-on-one-line", "import-on-one-line"])
def test_what_cannot_be_flattened_is_refused_in_one_line_naming_the_place(tmp_path, files, message):
    with pytest.raises(BundleError, match=re.escape(message)) as refused:
        Bundler(write_repo(tmp_path, files)).run()
    assert "\n" not in str(refused.value)


def test_command_writes_the_bundle_and_refuses_to_overwrite_the_entry(tmp_path, capsys):
    entry = write_repo(tmp_path / "repo", FAKE_REPO)
    out = tmp_path / "dist" / "main.py"
    bundle.main(["--entry", str(entry), "--out", str(out)])
    assert capsys.readouterr().out.startswith(f"{out}: main.py with 4 repo modules inlined, ")
    assert out.read_text().startswith("# Standalone main.py: the repo modules it imports are inlined below")
    assert sorted(p.name for p in out.parent.iterdir()) == ["main.py"]  # no temp file left behind
    with pytest.raises(SystemExit, match="would overwrite the entry script"):
        bundle.main(["--entry", str(entry), "--out", str(entry)])


def test_command_refusal_is_one_line_on_stderr(tmp_path):
    entry = write_repo(tmp_path, {"main.py": "import pkg\n", "pkg/__init__.py": ""})
    with pytest.raises(SystemExit, match=r"^error: main.py:1: `import pkg` binds a module object[^\n]*$"):
        bundle.main(["--entry", str(entry), "--out", str(tmp_path / "out.py")])
    assert not (tmp_path / "out.py").exists()


def train_losses(out_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train_loss", r.get("val_loss"))) for r in records]


def test_bundled_train_gpt_runs_alone_with_the_repo_versions_losses(tmp_path):
    bundle.main(["--out", str(tmp_path / "dist" / "train_gpt.py")])
    text = (tmp_path / "dist" / "train_gpt.py").read_text()
    assert repo_imports(text, repo_modules(ROOT)) == []
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert len(head.strip()) == 40
    assert f"# Source commit: {head.strip()}" in text
    # 256-token steps (the demo's are 1024): a quarter of the cost, the same code paths
    flags = ["--max-steps", "3", "--val-every", "0", "--val-tokens", "2048", "--sample-tokens", "0",
             "--no-plot", "--log-every", "1", "--tokens-per-step", "256", "--batch-size", "2"]
    alone = run_alone(text, tmp_path / "alone", *flags, "--out-dir", "out", timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    # the demo corpus is built next to the bundle, where data/demo.py keeps it in the repo
    assert sorted(p.name for p in (tmp_path / "alone" / "data" / "cache" / "demo").iterdir()) == [
        "demo_train_000000.bin", "demo_val_000000.bin"]
    repo = subprocess.run([sys.executable, "train_gpt.py", *flags, "--out-dir", str(tmp_path / "repo")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert repo.returncode == 0, repo.stderr[-3000:]
    expected = train_losses(tmp_path / "repo")
    assert len(expected) == 4  # 3 train steps and the final validation
    assert train_losses(tmp_path / "alone" / "out") == expected  # bitwise: same code, same CPU kernels
    shutil.rmtree(tmp_path / "alone" / "data")
