"""The speedrun GPT: gpt.py (architecture, presets) and attention.py (rotary, masks, back ends)."""

from model.gpt import GPT, GPT2_EOT, GPT2_VOCAB, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS", "GPT2_EOT", "GPT2_VOCAB"]
