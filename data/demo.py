"""The offline demo corpus: CPython's own documentation text, tokenized into two small shards.

`pydoc_data.topics` (the text behind `help("topic")`, ~465 KB) ships with every CPython, so the
demo needs no download. Each topic is one document; a fixed ~5% of topics, chosen by a hash of the
topic name, form the validation split (stable across machines, and across Python versions that add
topics).

    python -m data.demo [--dir DIR]   # build data/cache/demo and print its token counts
"""

import argparse
import sys
import zlib
from pathlib import Path
from pydoc_data.topics import topics

from data.shards import ShardError, check_shard, write_shard
from data.tokenizer import TokenizerUnavailable, encode_documents

DEMO_DIR = Path(__file__).resolve().parent / "cache" / "demo"
VAL_PERCENT = 5
SPLIT_FILES = {"train": "demo_train_000000.bin", "val": "demo_val_000000.bin"}


def is_val_topic(name: str) -> bool:
    """Whether topic `name` belongs to the validation split."""
    return zlib.crc32(name.encode()) % 100 < VAL_PERCENT


def demo_documents() -> dict[str, list[str]]:
    """The demo documents of each split, in sorted topic order."""
    names = sorted(topics)
    return {
        "train": [topics[name] for name in names if not is_val_topic(name)],
        "val": [topics[name] for name in names if is_val_topic(name)],
    }


def demo_shards(root: str | Path = DEMO_DIR) -> Path:
    """Build the demo shards under `root` unless valid ones are already there; return `root`."""
    root = Path(root)
    if _valid(root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    for split, documents in demo_documents().items():
        write_shard(root / SPLIT_FILES[split], encode_documents(documents))
    return root


def _valid(root: Path) -> bool:
    try:
        for name in SPLIT_FILES.values():
            check_shard(root / name)
    except ShardError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.demo", description="Build the offline demo shards.")
    parser.add_argument(
        "--dir", type=Path, default=DEMO_DIR, help=f"where to write them (default {DEMO_DIR})"
    )
    args = parser.parse_args(argv)
    try:
        root = demo_shards(args.dir)
    except (TokenizerUnavailable, OSError) as err:
        sys.exit(f"error: {err}")
    for split, name in SPLIT_FILES.items():
        print(f"{split}: {check_shard(root / name):,} tokens in {root / name}")


if __name__ == "__main__":
    main()
