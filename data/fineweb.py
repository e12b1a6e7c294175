"""Download the pre-tokenized FineWeb shards (GPT-2 tokens, .bin format) from the Hugging Face Hub.

    python -m data.fineweb [--train-shards N] [--dataset fineweb10B|fineweb100B|finewebedu10B] [--dir DIR]

Fetches the val shard and the first N train shards (default 9, enough for a 124M speedrun) into
data/<dataset>. Files already complete (valid header and size) are skipped, so re-running resumes;
huggingface_hub also resumes a partly downloaded file.
"""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from data.shards import ShardError, count_tokens, read_header

DATA_DIR = Path(__file__).resolve().parent


class Dataset(NamedTuple):
    repo_id: str
    prefix: str  # shard file names: {prefix}_val_000000.bin, {prefix}_train_000001.bin, ...
    train_shards: int  # how many train shards the repository holds


DATASETS = {
    "fineweb10B": Dataset("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": Dataset("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "finewebedu10B": Dataset("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
}

Download = Callable[[str, str, Path], object]  # (repo_id, filename, directory); writes directory/filename


class DownloadError(RuntimeError):
    """A download failed or was asked for wrongly; the message is one line saying what to do."""


def shard_names(dataset: str, train_shards: int) -> list[str]:
    """File names of the val shard and the first `train_shards` train shards of `dataset`."""
    prefix = DATASETS[dataset].prefix
    return [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, train_shards + 1)]


def hf_download(repo_id: str, filename: str, directory: Path) -> object:
    """Fetch one file of a Hub dataset repository into `directory`."""
    import huggingface_hub  # imported here: nothing else in the repo needs it
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its per-retry warnings would bury our one-line error
    return huggingface_hub.hf_hub_download(repo_id, filename, repo_type="dataset", local_dir=directory)


def is_complete(path: Path) -> bool:
    try:
        read_header(path)
    except ShardError:
        return False
    return True


def download_shards(
    dataset: str = "fineweb10B",
    train_shards: int = 9,
    directory: str | Path | None = None,
    *,
    download: Download | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> list[Path]:
    """Make sure `directory` holds complete val and train shards; return their paths."""
    spec = DATASETS[dataset]
    if not 0 <= train_shards <= spec.train_shards:
        raise DownloadError(
            f"--train-shards {train_shards}: {dataset} has {spec.train_shards} train shards; "
            f"expected 0 to {spec.train_shards}"
        )
    directory = Path(directory) if directory else DATA_DIR / dataset
    directory.mkdir(parents=True, exist_ok=True)
    download = download or hf_download
    names = shard_names(dataset, train_shards)
    for number, name in enumerate(names, start=1):
        path = directory / name
        status = f"[{number}/{len(names)}] {path}"
        if is_complete(path):
            log(f"{status}: complete, skipped")
            continue
        # An incomplete leftover must go: the Hub client may trust a file it finds in place.
        path.unlink(missing_ok=True)
        log(f"{status}: downloading from {spec.repo_id}")
        try:
            download(spec.repo_id, name, directory)
        except Exception as err:  # network, HTTP and disk errors all end the command the same way
            raise DownloadError(
                f"could not download {name} from the Hugging Face dataset {spec.repo_id} "
                f"({type(err).__name__}: {_first_sentence(err)}); {_fix_hint()} and re-run "
                "(complete files are kept)"
            ) from err
        read_header(path)  # a bad download raises ShardError naming the file
    return [directory / name for name in names]


def _first_sentence(err: Exception, limit: int = 160) -> str:
    sentence = str(err).strip().split("\n")[0].split(". ")[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _fix_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "unset HF_HUB_OFFLINE (it forbids downloads)"
    return "check the internet connection (and HF_ENDPOINT / HF_TOKEN if set)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.fineweb", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-shards", type=int, default=9, help="train shards to fetch (9)")
    parser.add_argument("--dataset", choices=DATASETS, default="fineweb10B", help="which set (fineweb10B)")
    parser.add_argument("--dir", type=Path, default=None, help="where to put them (data/<dataset>)")
    args = parser.parse_args(argv)
    try:
        paths = download_shards(args.dataset, args.train_shards, args.dir)
    except (DownloadError, ShardError, OSError) as err:
        sys.exit(f"error: {err}")
    tokens = count_tokens(paths)
    print(f"{len(paths)} shards ({tokens:,} tokens) in {paths[0].parent}")


if __name__ == "__main__":
    main()
