"""An offline corpus of about 4.4M GPT-2 tokens from what every CPython has: its standard library.

Documents: every .py file of the running interpreter's standard library (sysconfig's "stdlib"
path) outside the parts that distributions ship separately or newer versions dropped (EXCLUDED),
and every pydoc topic (`pydoc_data.topics`, the text of `help("topic")`). Each document is one JSONL
line {"text": ...}, in the order of the sha256 of its name, so the token stream mixes modules instead
of running through them alphabetically; `data.prepare` tokenizes them, every 20th document going to
the val split.

Determinism: the same interpreter gives byte-identical shards (the file set, the bytes, the order and
the tokenizer are all fixed). Another Python version has another standard library, so another
corpus: the manifest records the version and each shard's sha256, and a build made by a different
interpreter is rebuilt rather than reused. CPython 3.11.7 gives 591 documents, 4.21M train and 0.24M
val tokens.

    python -m data.stdlib_corpus [--dir DIR] [--max-documents N]   # build (or reuse) and print counts
"""

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

from data.durable import write_text_atomic
from data.prepare import PrepareError, prepare
from data.shards import ShardError, check_shard, list_shards
from data.tokenizer import TokenizerUnavailable

STDLIB_DIR = Path(__file__).resolve().parent / "cache" / "stdlib"
PREFIX = "stdlib"
VAL_FRACTION = 0.05
MANIFEST = "manifest.json"
# Directories (any path component) left out: test suites and tools that distributions package
# separately (Debian's libpython3-testsuite, idle, python3-tk) or that CPython 3.12/3.13 removed;
# and pydoc_data, whose topics.py holds the topics that are already documents of their own.
EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo",
                      "lib2to3", "distutils", "ensurepip", "pydoc_data"})


@dataclass(frozen=True)
class Document:
    name: str  # "stdlib/<relative path>" or "topic/<name>": unique, and the sort key's input
    text: str


def stdlib_documents(stdlib: Path | None = None) -> tuple[list[Document], list[str]]:
    """The corpus documents in corpus order, and the names of .py files skipped as not UTF-8."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    documents, skipped = [], []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED]  # never walk site-packages' bulk
        for path in (Path(folder) / f for f in files if f.endswith(".py")):
            relative = path.relative_to(root).as_posix()
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(relative)  # a source with another coding cookie: recorded
                continue
            documents.append(Document(f"stdlib/{relative}", text))
    documents += [Document(f"topic/{name}", text) for name, text in topics.items()]
    documents.sort(key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    return documents, sorted(skipped)


def stdlib_shards(root: str | Path = STDLIB_DIR, max_documents: int | None = None) -> Path:
    """Build the shards under `root` unless this interpreter's build is already there; return `root`.

    max_documents keeps only the first N documents of the corpus order (the quick, tested form).
    The manifest is written last: a build interrupted before it is redone on the next call.
    """
    root = Path(root)
    if max_documents is not None and max_documents < 2:
        raise ValueError(f"max_documents must be >= 2 (a train and a val document), got {max_documents}")
    wanted = {"python": platform.python_version(), "excluded": sorted(EXCLUDED), "val_fraction": VAL_FRACTION,
              "max_documents": max_documents}
    if _manifest_matches(root, wanted):
        return root
    documents, skipped = stdlib_documents()
    documents = documents[:max_documents]
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "stdlib.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in documents))
        summary = prepare([jsonl], root, val_fraction=VAL_FRACTION, prefix=PREFIX, workers=1, overwrite=True)
    shards = [p for split in ("val", "train") for p in summary.shards[split]]
    manifest = {**wanted, "documents": len(documents), "skipped_not_utf8": skipped, "tokens": summary.tokens,
                "sha256": {p.name: _sha256(p) for p in shards}}
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return root


def _manifest_matches(root: Path, wanted: dict) -> bool:
    """Whether `root` holds a complete build with these settings whose shards are intact."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        shards = list_shards(root, "train") + list_shards(root, "val")
        for shard in shards:
            check_shard(shard)
    except (OSError, ValueError):  # ShardError and JSONDecodeError are ValueErrors
        return False
    hashes = {p.name: _sha256(p) for p in shards}
    return all(manifest.get(k) == v for k, v in wanted.items()) and manifest.get("sha256") == hashes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.stdlib_corpus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=STDLIB_DIR,
                        help=f"where to write them (default {STDLIB_DIR})")
    parser.add_argument("--max-documents", type=int, default=None,
                        help="keep only the first N documents of the corpus order (default: all)")
    args = parser.parse_args(argv)
    try:
        root = stdlib_shards(args.dir, args.max_documents)
    except (PrepareError, ShardError, TokenizerUnavailable, OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    manifest = json.loads((root / MANIFEST).read_text())
    print(f"Python {manifest['python']}: {manifest['documents']:,} documents, "
          f"{manifest['tokens']['train']:,} train and {manifest['tokens']['val']:,} val tokens in {root}")


if __name__ == "__main__":
    main()
