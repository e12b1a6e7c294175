"""Shared fixtures: a tiny GPT saved as a checkpoint directory (training/checkpoint.py's format)."""

import dataclasses
import os

# As train_gpt.py sets it, before torch loads MKL: CPU GEMMs bitwise reproducible from process to process
# (the bitwise resume, distributed and bundle tests compare processes), inherited by every subprocess.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

from model import GPT, GPTConfig
from training.checkpoint import write_step

# GPT-2's padded vocabulary, so that sampled ids decode as text; everything else tiny.
TINY_GPT2 = GPTConfig(vocab_size=50304, n_layer=2, n_head=2, head_dim=8, dim=16, max_seq_len=64,
                      value_embeds=1)


def random_gpt(cfg: GPTConfig, seed: int = 0, scale: float = 0.5) -> GPT:
    """A GPT whose zero-initialized weights (head, output projections) are random too: N(0, scale²)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(checkpoint directory holding `latest`, the saved model)."""
    model = random_gpt(TINY_GPT2)
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    shared = dict(model=model.state_dict(), model_config=dataclasses.asdict(TINY_GPT2), config={}, step=7,
                  loader={})
    write_step(directory, 7, shared, {})
    return directory, model
