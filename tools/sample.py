"""Generate text from a saved model.

    python -m tools.sample CHECKPOINT --prompt "The meaning of" [--max-tokens 100] [--temperature 0.8]
                           [--top-k 40] [--seed 0] [--device auto|cpu|cuda]

CHECKPOINT is a step directory (holding shared.pt), a checkpoint directory (holding `latest`), or a
run's --out-dir (holding checkpoints/). The prompt follows <|endoftext|>, as every training document
does. The same seed on the same device gives the same text (training/sampling.py).
"""

import argparse
import sys

from data.tokenizer import TokenizerUnavailable
from training.checkpoint import CheckpointError, load_model
from training.runtime import resolve_device
from training.sampling import Sampling, sample


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
    how = Sampling(args.temperature, args.top_k or None, args.seed)
    try:
        model = load_model(args.checkpoint, resolve_device(args.device))
        text = sample(model, args.prompt, args.max_tokens, how)
    except (CheckpointError, TokenizerUnavailable) as error:
        sys.exit(f"error: {error}")
    print(text)


if __name__ == "__main__":
    main()
