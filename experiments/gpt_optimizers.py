"""Optimizers head to head on the speedrun GPT: how many steps each needs to reach AdamW's final val loss.

    python -m experiments.gpt_optimizers [--quick] [--steps N] [--out DIR] [--figure PNG]

Every contender trains the same small model/gpt.py GPT (same init, same batches, same steps, the
lr schedule of train_gpt.lr_factor: constant, then a linear cooldown over the last 40% to 0.1×):
  adamw               torch.optim.AdamW on every parameter
  muon                optim.Muon as train_gpt.build_optimizer makes it: hidden matrices by Newton–Schulz
                      (speedrun quintic, lr_scale √(d_out/d_in)), embeddings, head and scalars by Adam
  muon_embed_dual     the same, token and value embeddings by the embedding duality map (lr = matrix lr)
  muon_polar_express  as muon, with the Polar Express coefficients
  torch_muon          torch.optim.Muon on the hidden matrices (bf16 Newton–Schulz, forced; its "original"
                      scale √max(1, d_out/d_in)), torch.optim.AdamW on the rest
All Adam parts use betas (0.9, 0.95), eps 1e-8; no weight decay anywhere; Muon momentum 0.95 (Nesterov).
Protocol: AdamW sweeps its lr first; every other contender gives its Adam-handled parameters AdamW's
best lr and sweeps its matrix lr. Sweeps are powers of 2; while the best lr sits at an edge of the
grid, the grid grows one point past it (at most twice). A contender's best run has the lowest final
val loss; for it we report the first step at which its val loss (evaluated every eval_every steps,
linearly interpolated) reaches AdamW's final val loss.

Data: the offline demo corpus (data.demo: CPython's docs, GPT-2 tokens). Its train split uses only
~5k distinct ids, so the ids are compacted to those (in id order) plus one shared id for val tokens
never seen in training: the 50304-wide head would otherwise cost ten times as much on the CPU and
learn nothing from the unused rows. Needs the GPT-2 tokenizer only if the demo shards are not built.
"""

import dataclasses
import math
import sys
import time
from itertools import pairwise, takewhile

import numpy as np
import torch

from data.demo import demo_shards
from data.loader import TokenLoader, validation_batches
from data.shards import ShardError, list_shards, read_shard
from data.tokenizer import EOT, TokenizerUnavailable
from experiments.report import (
    experiment_parser,
    finish,
    finite_or_none,
    integer_ticks,
    mode_settings,
    output_paths,
    pyplot,
    save_figure,
    torch_threads,
)
from model import GPT, GPTConfig
from training import recipe as train_gpt

NAME = "gpt_optimizers"
ADAM = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
CONTENDERS = {
    "adamw": "AdamW",
    "muon": "Muon (quintic), embed Adam",
    "muon_embed_dual": "Muon (quintic), embed dual",
    "muon_polar_express": "Muon (Polar Express), embed Adam",
    "torch_muon": "torch.optim.Muon + AdamW",
}
SETTINGS = {
    # n_layer 2, dim 64 keeps torch.optim.Muon's bf16 Newton–Schulz (~100x slower than float32 on
    # this CPU) from dominating; the head over the compacted vocabulary still costs the most.
    "full": dict(model=dict(n_layer=2, dim=64, n_head=2, head_dim=32), seq_len=128, batch_size=8,
                 steps=200, eval_every=20, val_tokens=8192,
                 log2_lrs={"adamw": [-8, -7, -6], "muon": [-5, -4, -3], "muon_embed_dual": [-5, -4, -3],
                           "muon_polar_express": [-5, -4, -3], "torch_muon": [-6, -5, -4]},
                 max_extend=2),
    "quick": dict(model=dict(n_layer=2, dim=32, n_head=2, head_dim=16), seq_len=32, batch_size=4,
                  steps=16, eval_every=8, val_tokens=2048,
                  log2_lrs={"adamw": [-7, -5], "muon": [-4, -2], "muon_embed_dual": [-4, -2],
                            "muon_polar_express": [-4, -2], "torch_muon": [-5, -3]},
                  max_extend=0),
}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train/val shards and the map from GPT-2 ids to the compact vocabulary."""

    train_files: list
    val_files: list
    lookup: torch.Tensor  # (65536,) int64: GPT-2 id -> compact id
    vocab_size: int


def compact_corpus(root) -> Corpus:
    """The demo shards with ids compacted: ids seen in train → 0..n-1 in id order, all others → n."""
    train_files, val_files = list_shards(root, "train"), list_shards(root, "val")
    seen = np.unique(np.concatenate([np.asarray(read_shard(f)) for f in train_files]))
    lookup = np.full(2**16, len(seen), dtype=np.int64)
    lookup[seen] = np.arange(len(seen))
    return Corpus(train_files, val_files, torch.from_numpy(lookup), len(seen) + 1)


def make_optimizers(contender: str, model: GPT, lr: float, adam_lr: float) -> list[torch.optim.Optimizer]:
    """The optimizer(s) of one contender; lr is its swept lr, adam_lr that of its Adam-handled params."""
    if contender == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=lr, **ADAM)]
    if contender == "torch_muon":
        hidden = [p for p in model.blocks.parameters() if p.ndim == 2]
        hidden_ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if id(p) not in hidden_ids]
        return [torch.optim.Muon(hidden, lr=lr, weight_decay=0.0, momentum=0.95, nesterov=True),
                torch.optim.AdamW(rest, lr=adam_lr, **ADAM)]
    dual_embed = contender == "muon_embed_dual"
    cfg = train_gpt.TrainConfig(
        lr=lr, embed_lr=lr if dual_embed else adam_lr, head_lr=adam_lr, scalar_lr=adam_lr,
        embed_map="dual" if dual_embed else "adam", lr_scale="spectral", momentum=0.95,
        ns_coefficients="polar_express" if contender == "muon_polar_express" else "muon",
        adam_betas=ADAM["betas"], adam_eps=ADAM["eps"], weight_decay=0.0,
    )
    return [train_gpt.build_optimizer(model, cfg)]


def train_run(contender: str, lr: float, adam_lr: float, corpus: Corpus, settings: dict, seed: int) -> dict:
    """One training run; its val curve [(step, loss)], final val loss (None if it diverged) and time."""
    config = GPTConfig(vocab_size=corpus.vocab_size, max_seq_len=settings["seq_len"], value_embeds=1,
                       bos_token=int(corpus.lookup[EOT]), **settings["model"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT(config)
    optimizers = make_optimizers(contender, model, lr, adam_lr)
    groups = [g for opt in optimizers for g in opt.param_groups]
    base_lrs = [g["lr"] for g in groups]
    schedule = train_gpt.TrainConfig(max_steps=settings["steps"])
    loader = TokenLoader(corpus.train_files, settings["batch_size"], settings["seq_len"])
    val = [(corpus.lookup[x], corpus.lookup[y]) for x, y in validation_batches(
        corpus.val_files, settings["batch_size"], settings["seq_len"], settings["val_tokens"])]
    curve = [(0, evaluate(model, val))]
    start = time.perf_counter()
    for step in range(settings["steps"]):
        for group, base in zip(groups, base_lrs, strict=True):
            group["lr"] = base * train_gpt.lr_factor(step, schedule)
        x, y = loader.next_batch()
        loss = model(corpus.lookup[x], corpus.lookup[y])
        if not torch.isfinite(loss):
            break
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if (step + 1) % settings["eval_every"] == 0 or step + 1 == settings["steps"]:
            curve.append((step + 1, evaluate(model, val)))
    diverged = curve[-1][0] != settings["steps"] or not math.isfinite(curve[-1][1])
    return {"lr": lr, "adam_lr": adam_lr, "val_curve": [(s, finite_or_none(v)) for s, v in curve],
            "final_val_loss": None if diverged else curve[-1][1], "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: GPT, batches: list) -> float:
    model.eval()
    loss = sum(model(x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def sweep(run_at, log2_lrs: list[int], max_extend: int) -> list[dict]:
    """Runs at lr = 2^k for k in log2_lrs, extended one point past an edge that holds the best."""
    runs = {k: run_at(2.0**k) for k in log2_lrs}
    for _ in range(max_extend):
        best = min(runs, key=lambda k: (_loss_or_inf(runs[k]), k))
        if best not in (min(runs), max(runs)):
            break
        k = best - 1 if best == min(runs) else best + 1
        runs[k] = run_at(2.0**k)
    return [runs[k] for k in sorted(runs)]


def _loss_or_inf(run: dict) -> float:
    return math.inf if run["final_val_loss"] is None else run["final_val_loss"]


def steps_to_reach(curve: list, target: float) -> float | None:
    """First step at which the val curve reaches `target`, interpolating linearly between evaluations.

    None if it never does; a NaN evaluation (None) ends the curve, as divergence ends a run.
    """
    valid = list(takewhile(lambda point: point[1] is not None, curve))
    if valid and valid[0][1] <= target:
        return valid[0][0]
    for (s0, v0), (s1, v1) in pairwise(valid):
        if v1 <= target:
            return s1 - (s1 - s0) * (target - v1) / (v0 - v1)
    return None


def run(corpus: Corpus, settings: dict, seed: int) -> dict:
    """AdamW's sweep, then every other contender's with AdamW's best lr for its Adam part."""
    contenders: dict[str, dict] = {}
    adam_lr = None
    for contender, label in CONTENDERS.items():
        def run_at(lr, contender=contender, adam_lr=adam_lr):  # AdamW itself has no adam_lr yet
            result = train_run(contender, lr, adam_lr or lr, corpus, settings, seed)
            print(f"{contender:18s} lr {lr:.5f}: final val loss {result['final_val_loss']} "
                  f"({result['seconds']:.0f}s)", flush=True)
            return result

        runs = sweep(run_at, settings["log2_lrs"][contender], settings["max_extend"])
        best = min(runs, key=_loss_or_inf)
        contenders[contender] = {"label": label, "runs": runs, "best": best}
        if contender == "adamw":
            adam_lr = best["lr"]
    target = contenders["adamw"]["best"]["final_val_loss"]
    for result in contenders.values():
        result["steps_to_adamw_final"] = (None if target is None
                                          else steps_to_reach(result["best"]["val_curve"], target))
    return {"adamw_final_val_loss": target, "contenders": contenders}


def plot(results: dict, path):
    """Left: final val loss against lr per contender. Right: each best run's val curve, target marked."""
    plt = pyplot()
    fig, (sweeps, curves) = plt.subplots(1, 2, figsize=(10, 4))
    target = results["adamw_final_val_loss"]
    for contender in results["contenders"].values():
        points = [(math.log2(r["lr"]), r["final_val_loss"]) for r in contender["runs"]
                  if r["final_val_loss"] is not None]
        line, = sweeps.plot(*zip(*points, strict=True), "o-", ms=3, label=contender["label"])
        best = contender["best"]
        if best["final_val_loss"] is not None:
            sweeps.plot(math.log2(best["lr"]), best["final_val_loss"], "*", ms=13, color=line.get_color(),
                        mec="k")
        steps, losses = zip(*[(s, v) for s, v in best["val_curve"] if v is not None], strict=True)
        reached = contender["steps_to_adamw_final"]
        label = f"{contender['label']}: " + (f"{reached:.0f} steps" if reached is not None else "not reached")
        curves.plot(steps[1:], losses[1:], "o-", ms=3, color=line.get_color(), label=label)
    sweeps.set(xlabel="log2 lr (AdamW: its lr; others: the matrix lr)", ylabel="final val loss",
               title="lr sweeps (best starred)")
    integer_ticks(sweeps)
    if target is not None:
        curves.axhline(target, color="k", ls=":", lw=1, label="AdamW's final val loss")
    curves.set(xlabel="step", ylabel="val loss", title="best run of each: steps to AdamW's final loss")
    for ax in (sweeps, curves):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    settings = results["settings"]
    fig.suptitle(f"GPT n_layer {settings['model']['n_layer']}, dim {settings['model']['dim']}, "
                 f"{settings['steps']} steps of {settings['batch_size']}×{settings['seq_len']} tokens, "
                 f"demo corpus (vocab compacted to {results['vocab_size']})", fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = experiment_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    args = parser.parse_args(argv)
    settings = mode_settings(args, SETTINGS)
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        settings.update(steps=args.steps, eval_every=max(1, args.steps // 10))
    paths = output_paths(args, NAME)
    try:
        corpus = compact_corpus(demo_shards())
    except (ShardError, TokenizerUnavailable) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"demo corpus, vocabulary compacted to {corpus.vocab_size} ids")
    with torch_threads(args.threads):
        outcome = run(corpus, settings, args.seed)
    for contender in outcome["contenders"].values():
        best = contender["best"]
        print(f"{contender['label']:34s} best lr {best['lr']:.5f}, final val loss {best['final_val_loss']}, "
              f"steps to AdamW's final {contender['steps_to_adamw_final']}")
    return finish(NAME, argv, args, paths, {"vocab_size": corpus.vocab_size, "settings": settings, **outcome},
                  plot)

if __name__ == "__main__":
    main()
