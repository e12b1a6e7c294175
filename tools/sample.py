"""Generate text from a saved model.

    python -m tools.sample CHECKPOINT --prompt "The meaning of" [--max-tokens 100] [--temperature 0.8]
                           [--top-k 40] [--seed 0] [--device auto|cpu|cuda]

CHECKPOINT is a step directory (holding shared.pt), a checkpoint directory (holding `latest`), or a
run's --out-dir (holding checkpoints/). The prompt follows <|endoftext|>, as every training document
does. The same seed on the same device gives the same text.
"""

import argparse
import sys
from pathlib import Path

import torch

from data.tokenizer import EOT, TokenizerUnavailable, gpt2_encoding
from tools.checkpoint import CheckpointError, load_model
from training.runtime import resolve_device


def open_checkpoint(path: str | Path, device: torch.device) -> torch.nn.Module:
    """The GPT of a checkpoint, in eval mode on `device`; a missing or damaged one: one-line SystemExit."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    try:
        return load_model(path, device)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None


def sample(model: torch.nn.Module, prompt: str, max_tokens: int, temperature: float = 0.8,
           top_k: int | None = 40, seed: int = 0) -> str:
    """The prompt and its sampled continuation of max_tokens tokens."""
    encoding = gpt2_encoding()
    device = next(model.parameters()).device
    idx = torch.tensor([[EOT, *encoding.encode_ordinary(prompt)]], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return encoding.decode(out[0, 1:].tolist())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.sample",
                                     description="Sample text from a checkpoint.")
    parser.add_argument("checkpoint", help="step directory, checkpoint directory, or run --out-dir")
    parser.add_argument("--prompt", default="The")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40, help="0: sample from the whole vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    model = open_checkpoint(args.checkpoint, resolve_device(args.device))
    try:
        text = sample(model, args.prompt, args.max_tokens, args.temperature, args.top_k or None, args.seed)
    except TokenizerUnavailable as error:
        sys.exit(f"error: {error}")
    print(text)


if __name__ == "__main__":
    main()
