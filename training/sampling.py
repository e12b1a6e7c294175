"""Text from a trained GPT: the prompt after <|endoftext|> (as every training document starts), then
tokens drawn one at a time by the model's own generate (model/gpt.py).

Each new token is drawn from softmax(logits / temperature) over the top_k largest logits (all of them
with top_k None), with a torch.Generator seeded by `seed`: the same seed on the same device gives the
same text.
"""

from dataclasses import dataclass

import torch

from data.tokenizer import EOT, gpt2_encoding


@dataclass(frozen=True)
class Sampling:
    """How each token is drawn (the module docstring)."""

    temperature: float = 0.8
    top_k: int | None = 40
    seed: int = 0


def sample(model: torch.nn.Module, prompt: str, max_tokens: int, how: Sampling = Sampling()) -> str:
    """The prompt and its sampled continuation of max_tokens tokens, decoded."""
    encoding = gpt2_encoding()
    device = next(model.parameters()).device
    idx = torch.tensor([[EOT, *encoding.encode_ordinary(prompt)]], device=device)
    generator = torch.Generator(device=device).manual_seed(how.seed)
    out = model.generate(idx, max_tokens, temperature=how.temperature, top_k=how.top_k, generator=generator)
    return encoding.decode(out[0, 1:].tolist())
