"""Learning-rate transfer across depth on the GPT, with and without the modular norm's step shares.

    python -m experiments.gpt_depth [--quick] [--workers N] [--depths 2,4,8] [--out DIR] [--figure PNG]
    python -m experiments.gpt_depth [--quick] --run VARIANT:DEPTH:K   # one run at η = 2^K

The model.GPT of the head-to-head (experiments/gpt_optimizers.py: same width, corpus, vocabulary,
batches and schedule, shorter runs) at depths L = n_layer, made the pre-norm residual network that
`gpt_tree` describes: no value embeddings, the U-net skip weights fixed at 0 and every block's
(x, x0) mix at (1, 0). Every weight steps by its duality map in optim.Muon, no Adam anywhere: the
embedding map for embed, √(d_out/d_in)·U Vᵀ for the blocks' matrices (lr_scale "spectral") and for
the head (head_linear). Variants, over a grid of η (powers of 2):
  plain    every weight at lr η;
  modular  weight w at η·s_w, s_w its share of the step from gpt_tree(L) (experiments/modular.py).
The score is the final val loss; the question is how far the best η moves across depth.
"""

import functools
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from data.prepare import PrepareError
from data.shards import ShardError
from data.tokenizer import TokenizerUnavailable
from experiments.gpt_train import (
    Optimizers,
    Runner,
    loss_or_inf,
    run_alone,
    run_sweep,
    stdlib_corpus,
    sweep_log2,
    train,
)
from experiments.modular import Module, atom, bond, compose, modular_groups, residual, stack
from experiments.report import experiment_parser, finish, int_list, log2_spread, output_paths
from experiments.sweeps import plot_family
from model import GPT, GPTConfig
from optim import Muon

NAME = "gpt_depth"
VARIANTS = {
    "plain": "every weight at lr η (its duality map)",
    "modular": "weight w at η·s_w (modular-norm shares)",
}
KINDS = {"embed.weight": "embed", "lm_head.weight": "head_linear"}  # every other weight: hidden
SETTINGS = {
    "full": dict(model=dict(dim=64, n_head=2, head_dim=32), depths=[2, 4, 8], vocab_size=1024, seq_len=128,
                 batch_size=16, steps=500, eval_every=50, val_tokens=32768, max_extend=3,
                 start={"plain": -5, "modular": -3}),
    "quick": dict(model=dict(dim=32, n_head=1, head_dim=32), depths=[2, 4], vocab_size=256, seq_len=32,
                  batch_size=4, steps=6, eval_every=3, val_tokens=512, max_extend=0,
                  start={"plain": -5, "modular": -3}),
}


def gpt_tree(n_layer: int, block_mass: float = 5.0) -> Module:
    """The residual GPT of `residual_gpt` as the modular norm sees it: embed, 2L sub-layers, head.

    The stream is x_{j+1} = x_j + f_j(rms_norm(x_j)) (j = 0..2L−1, attention and MLP in turn) and
    the head reads rms_norm(x_2L). Every f_j and the head see the stream only through rms_norm, so
    dividing it by j + 1 changes nothing computed: z_j = x_j/(j + 1) follows the residual of a
    well-normed network, z_{j+1} = (1 − a_j)·z_j + a_j·f_j(z_j) with a_j = 1/(j + 2) (x_j sums j + 1
    unit-RMS terms). Masses: embed and head 1, the blocks `block_mass` (Modula's GPT: 5) shared
    equally by their 6L matrices. Sensitivities (assumed, as for any well-normed network): 1 for
    RMSNorm, ReLU² and every matrix; the attention core takes the tuple (q, k, v), whose norm is the
    sum of the three, to an output that moves no more than their mean (it averages value rows; q and
    k enter through QK-normed dot products), a bond of sensitivity 1/3, so attention, like the MLP,
    has sensitivity 1. Shares: embed and head 1/(2 + block_mass) each; in sub-layer j, each of q, k
    and v (three matrices of one tensor: a `stack`) gets 3c_j, o, fc and proj c_j, with
    c_j = block_mass/(2 + block_mass)·(j + 2)/(6L): the first sub-layers' shares fall as 1/L, the last
    ones' hardly change with depth.
    """
    mass = block_mass / (6 * n_layer)
    sublayers = []
    for i in range(n_layer):
        block = f"blocks.{i}."
        qkv = stack(f"{block}attn.qkv.weight", 3, mass)  # q, k, v: one tensor, three matrices
        sublayers.append(compose(qkv, bond(1 / 3), atom(f"{block}attn.o.weight", mass)))
        sublayers.append(compose(atom(f"{block}mlp.fc.weight", mass), atom(f"{block}mlp.proj.weight", mass)))
    residuals = [residual(f, 1 / (j + 2)) for j, f in enumerate(sublayers)]
    return compose(atom("embed.weight"), *residuals, atom("lm_head.weight"))


def residual_gpt(config: GPTConfig) -> GPT:
    """model.GPT as the residual network of gpt_tree: skips and the x0 mix fixed off, no value tables."""
    if config.value_embeds:
        raise ValueError(f"residual_gpt: value_embeds must be 0 (gpt_tree has no value tables), got "
                         f"{config.value_embeds}")
    model = GPT(config)
    with torch.no_grad():
        model.skip_weights.zero_()
    fixed = [model.skip_weights, *(p for b in model.blocks for p in (b.lambdas, b.attn.value_lambdas))]
    for p in fixed:
        p.requires_grad_(False)  # lambdas stay (1, 0); value_lambdas have no value embedding to mix
    return model


def depth_optimizer(model: GPT, lr: float, modular: bool) -> Optimizers:
    """optim.Muon with one group per weight: lr·(its share) if modular, else lr."""
    params = {name: [p] for name, p in model.named_parameters() if p.requires_grad}
    groups = modular_groups(params, gpt_tree(model.config.n_layer), lr, kinds=KINDS, kind="hidden")
    if not modular:
        groups = [{**g, "lr": lr} for g in groups]
    muon = Muon(groups, lr_scale="spectral")
    return Optimizers([muon])


def run_spec(spec: dict) -> dict:
    """One run: spec = {"mode", "variant", "n_layer", "log2_lr", "seed"}; what it gives and its command."""
    settings = SETTINGS[spec["mode"]]
    corpus = _corpus(spec["mode"] == "quick", settings["vocab_size"])
    config = GPTConfig(vocab_size=corpus.vocab_size, max_seq_len=settings["seq_len"], n_layer=spec["n_layer"],
                       value_embeds=0, bos_token=corpus.bos, **settings["model"])
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])
        model = residual_gpt(config)
    optimizers = depth_optimizer(model, 2.0 ** spec["log2_lr"], spec["variant"] == "modular")
    quick = " --quick" if spec["mode"] == "quick" else ""
    command = (f"python -m experiments.{NAME}{quick} --run {spec['variant']}:{spec['n_layer']}:"
               f"{spec['log2_lr']} --seed {spec['seed']}")
    return {"command": command, **spec, **train(model, optimizers, corpus, settings)}


@functools.cache
def _corpus(quick: bool, vocab_size: int):
    return stdlib_corpus(quick, vocab_size)


def sweep(runner: Runner, mode: str, variant: str, n_layer: int, seed: int) -> dict:
    """The η sweep of one variant at one depth, in the layout experiments.sweeps.plot_family draws."""
    settings = SETTINGS[mode]
    spec = dict(mode=mode, variant=variant, n_layer=n_layer, seed=seed)
    runs = sweep_log2(lambda k: runner.submit({**spec, "log2_lr": k}), settings["start"][variant],
                      settings["max_extend"])
    best = min(runs, key=lambda k: (loss_or_inf(runs[k]), k))
    best_loss = runs[best]["final_val_loss"]
    return {"depth": n_layer, "lrs": [2.0**k for k in runs],
            "val_loss": [r["final_val_loss"] for r in runs.values()],
            "best_lr": None if best_loss is None else 2.0**best, "best_val_loss": best_loss,
            "runs": list(runs.values())}


def run(runner: Runner, mode: str, depths: list[int], seed: int, workers: int) -> dict:
    """Both variants at every depth, concurrently when workers > 1."""
    jobs = [(variant, depth) for variant in VARIANTS for depth in depths]
    with ThreadPoolExecutor(len(jobs) if workers > 1 else 1) as drivers:
        futures = {job: drivers.submit(sweep, runner, mode, *job, seed) for job in jobs}
        done = {job: future.result() for job, future in futures.items()}
    family = {}
    for variant, label in VARIANTS.items():
        sweeps = [done[variant, depth] for depth in depths]
        family[variant] = {"label": label, "sweeps": sweeps,
                           "best_lr_log2_spread": log2_spread([s["best_lr"] for s in sweeps])}
        print(f"{variant}: best η by depth {[(s['depth'], s['best_lr']) for s in sweeps]}", flush=True)
    return family


def plot(results: dict, path):
    s = results["settings"]
    title = (f"LR transfer across depth, residual GPT dim {s['model']['dim']}, {s['steps']} steps of "
             f"{s['batch_size']}×{s['seq_len']} tokens, stdlib corpus (vocab {s['vocab_size']})")
    return plot_family(results["variants"], "depth", "plasma", title, path, score="val_loss",
                       ylabel="final val loss", top=None)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = experiment_parser(__doc__)
    parser.add_argument("--depths", type=int_list, default=None, help="comma-separated depths (n_layer >= 2)")
    parser.add_argument("--workers", type=int, default=1, help="processes running runs at once (default 1)")
    parser.add_argument("--run", default=None, metavar="VARIANT:DEPTH:K", help="only one run, at η = 2^K")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    depths = args.depths or SETTINGS[mode]["depths"]
    if min(depths) < 2 or args.workers < 1:
        parser.error(f"--depths must each be >= 2 (got {depths}) and --workers >= 1 (got {args.workers})")
    try:
        _corpus(args.quick, SETTINGS[mode]["vocab_size"])
    except (PrepareError, ShardError, TokenizerUnavailable) as err:
        raise SystemExit(f"error: {err}") from None
    if args.run:
        variant, depth, k = _parse_run(parser, args.run)
        return run_alone(run_spec, dict(mode=mode, variant=variant, n_layer=depth, log2_lr=k, seed=args.seed),
                         args.threads)
    paths = output_paths(args, NAME)
    variants = run_sweep(run_spec, paths[0].with_suffix(".runs.jsonl"), args.workers, args.threads,
                         lambda runner: run(runner, mode, depths, args.seed, args.workers))
    return finish(NAME, argv, args, paths, {"settings": {**SETTINGS[mode], "depths": depths},
                                            "variants": variants}, plot)


def _parse_run(parser, text: str) -> tuple[str, int, int]:
    variant, _, rest = text.partition(":")
    try:
        depth, k = (int(v) for v in rest.split(":"))
    except ValueError:
        parser.error(f"--run {text!r}: expected VARIANT:DEPTH:K with integers DEPTH and K")
    if variant not in VARIANTS or depth < 2:
        parser.error(f"--run {text!r}: VARIANT is one of {', '.join(VARIANTS)}, DEPTH >= 2")
    return variant, depth, k


if __name__ == "__main__":
    main()
