"""The speedrun GPT: gpt.py (architecture, presets) and attention.py (rotary, masks, back ends)."""

from model.gpt import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS"]
