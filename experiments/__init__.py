"""Experiments that check the papers' claims, each a command with a --quick CPU mode (docs/EXPERIMENTS.md).

    python -m experiments.lr_transfer     # best LR across width: dualized SGD vs Adam (MLP)
    python -m experiments.stable_rank     # stable rank of Newton–Schulz, raw and exact-polar updates
    python -m experiments.depth           # best LR across depth, with and without modular-norm shares
    python -m experiments.gpt_optimizers  # AdamW vs Muon variants vs torch.optim.Muon on the demo GPT

Each writes <name>.json and <name>.png under --out (default out/experiments/full or .../quick).
"""
