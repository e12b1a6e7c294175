"""HellaSwag evaluation of a saved model (optional; not part of the speedrun's metric).

    python -m tools.hellaswag CHECKPOINT [--file hellaswag_val.jsonl] [--limit N] [--device auto|cpu|cuda]

Each example has a context and four endings, one of them right. The model scores each ending by the
sum of its tokens' log-probabilities given the context: `acc` picks the ending with the largest sum,
`acc_norm` the one with the largest mean per token (which does not favour short endings). The
validation file (10,042 examples; JSON lines with fields ctx, endings, label) is read from --file, or
downloaded once into data/cache/hellaswag/. Guessing scores 0.25.
"""

import argparse
import itertools
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from data.tokenizer import EOT, TokenizerUnavailable, gpt2_encoding
from training.checkpoint import CheckpointError, load_model
from training.runtime import resolve_device

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE_DIR = Path(__file__).resolve().parents[1] / "data" / "cache" / "hellaswag"


def read_examples(path: Path) -> Iterator[dict]:
    """The examples of a HellaSwag JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                yield {"ctx": example["ctx"], "endings": example["endings"], "label": int(example["label"])}
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a HellaSwag example ({error!r}); "
                                 f"expected JSON with ctx, endings, label") from None


def validation_file(cache_dir: Path = CACHE_DIR) -> Path:
    """hellaswag_val.jsonl in cache_dir, downloaded from URL the first time."""
    path = cache_dir / "hellaswag_val.jsonl"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        urllib.request.urlretrieve(URL, partial)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", error)
        raise SystemExit(f"error: could not download {URL} ({reason}); pass --file PATH to a local "
                         f"hellaswag_val.jsonl") from None
    os.replace(partial, path)
    return path


def tokenize(example: dict) -> tuple[list[int], list[list[int]]]:
    """Context tokens (after <|endoftext|>) and each ending's tokens (with its leading space)."""
    encoding = gpt2_encoding()
    context = [EOT, *encoding.encode_ordinary(example["ctx"])]
    return context, [encoding.encode_ordinary(" " + ending) for ending in example["endings"]]


@torch.no_grad()
def score_endings(model, context: list[int], endings: list[list[int]],
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ending: the sum of its tokens' log-probabilities given the context, and its token count.

    The endings are scored in one batch, right-padded (causal attention: padding never reaches them);
    rows longer than the model's max_seq_len lose context from the left.
    """
    limit = model.config.max_seq_len
    rows = [(context + ending)[-limit:] for ending in endings]
    width = max(len(row) for row in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)  # positions holding an ending token
    for i, (row, ending) in enumerate(zip(rows, endings, strict=True)):
        idx[i, :len(row)] = torch.tensor(row)
        scored[i, len(row) - min(len(ending), len(row) - 1):len(row)] = True
    idx = idx.to(device)
    logprobs = F.log_softmax(model(idx).float()[:, :-1], dim=-1)  # position t predicts token t + 1
    token_logprobs = logprobs.gather(-1, idx[:, 1:, None]).squeeze(-1).cpu()
    mask = scored[:, 1:]
    return (token_logprobs * mask).sum(dim=1), mask.sum(dim=1)


def evaluate_hellaswag(model, examples: Iterable[dict], device: torch.device | str,
                       report_every: int = 0) -> dict:
    """{"n", "acc", "acc_norm"} of `model` on HellaSwag-format examples (ctx, endings, label)."""
    n = correct = correct_norm = 0
    for example in examples:
        sums, counts = score_endings(model, *tokenize(example), device)
        label = example["label"]
        correct += int(sums.argmax()) == label
        correct_norm += int((sums / counts).argmax()) == label
        n += 1
        if report_every and n % report_every == 0:
            print(f"{n} examples: acc {correct / n:.4f} acc_norm {correct_norm / n:.4f}", flush=True)
    if n == 0:
        raise ValueError("no HellaSwag examples to evaluate")
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.hellaswag",
                                     description="HellaSwag accuracy of a checkpoint.")
    parser.add_argument("checkpoint", help="step directory, checkpoint directory, or run --out-dir")
    parser.add_argument("--file", type=Path,
                        help=f"hellaswag_val.jsonl (default: downloaded once into {CACHE_DIR})")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    try:
        model = load_model(args.checkpoint, device)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    path = args.file or validation_file()
    if not path.is_file():
        sys.exit(f"error: --file {path}: no such file")
    examples = read_examples(path)
    if args.limit:
        examples = itertools.islice(examples, args.limit)
    try:
        result = evaluate_hellaswag(model, examples, device, report_every=1000)
    except (ValueError, TokenizerUnavailable) as error:
        sys.exit(f"error: {error}")
    print(f"hellaswag {path}: {result['n']} examples, acc {result['acc']:.4f}, "
          f"acc_norm {result['acc_norm']:.4f}")


if __name__ == "__main__":
    main()
