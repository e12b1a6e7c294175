"""Experiments that check the papers' claims, each a command with a --quick CPU mode (docs/EXPERIMENTS.md).

    python -m experiments.lr_transfer     # best LR across width: dualized SGD vs Adam (MLP)
    python -m experiments.stable_rank     # stable rank of Newton–Schulz, raw and exact-polar updates
    python -m experiments.depth           # best LR across depth, with and without modular-norm shares (MLP)
    python -m experiments.gpt_optimizers  # AdamW vs the Muon variants vs torch.optim.Muon on the GPT
    python -m experiments.gpt_depth       # best LR across depth on the GPT, with and without the shares

Each writes <name>.json and <name>.png under --out (default out/experiments/full or .../quick); the
GPT experiments also keep every finished run in <name>.runs.jsonl there and resume from it.
`modular.py` is the modular norm's mass and sensitivity bookkeeping the depth experiments use.
"""
