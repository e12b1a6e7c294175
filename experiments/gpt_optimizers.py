"""Optimizers head to head on the speedrun GPT: final val loss, and steps to reach AdamW's final loss.

    python -m experiments.gpt_optimizers [--quick] [--workers N] [--contenders a,b] [--out DIR] [--figure PNG]
    python -m experiments.gpt_optimizers [--quick] --run CONTENDER:GROUP=K,... [--seed S]   # one run

Every contender trains the same model.GPT (same init for a seed, same batches, the schedule of
experiments/gpt_train.py: constant lr then a cooldown, momentum warm-up 0.85 → 0.95) on fresh tokens
of the stdlib corpus (data.stdlib_corpus), never repeating one. Param groups: hidden (the blocks'
matrices), embed (token and value embeddings), head (lm_head), scalars (gains, lambdas, skip weights).

  adamw                        torch.optim.AdamW on every parameter, one lr ("all")
  muon                         the speedrun's split: hidden by Newton–Schulz (speedrun quintic, lr_scale
                               "muon" √max(1, d_out/d_in)); embed and head by Adam
  muon_embed_dual              as muon, embed by the embedding duality map (unit-RMS rows)
  muon_embed_dual_head_linear  as muon_embed_dual, head by the Linear map √(d_out/d_in)·U Vᵀ
  muon_embed_dual_head_sign    as muon_embed_dual, head by the sign map sign(G)/d_in
  muon_polar_express           as muon, with the Polar Express coefficients
  torch_muon                   torch.optim.Muon on hidden (bf16 Newton–Schulz, its "original" scale;
                               the 3-D q, k, v stacks, which it refuses, by the same update in
                               optim.Muon), torch.optim.AdamW on embed and head
Every group with a map of its own has an lr of its own. Scalars: Adam at the speedrun's lr 0.04 in
every contender but adamw (the same map everywhere, not swept). Adam parts: the speedrun's betas
(0.8, 0.95) and eps 1e-10; the adamw baseline: betas (0.9, 0.95), eps 1e-8. No weight decay.

Protocol: lrs are powers of 2, written as log2. A contender sweeps its groups one at a time, in the
order of its `swept`, from its start (or, for one marked `after`, from that contender's best): three
points around the current best, the other groups held, grown one point past an edge holding the
best, at most max_extend times. Its best setting (lowest final val loss, seed 0) is then run with
the other seeds. Steps to AdamW's final loss are paired by seed: the first step (val every
eval_every steps, interpolated) at which seed s's val loss reaches AdamW seed s's final val loss.
Every run's record holds the command that repeats it.
"""

import functools
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from data.prepare import PrepareError
from data.shards import ShardError
from data.tokenizer import TokenizerUnavailable
from experiments.gpt_train import (
    Optimizers,
    Runner,
    loss_or_inf,
    mean_std,
    run_alone,
    run_sweep,
    stdlib_corpus,
    steps_to_reach,
    sweep_log2,
    train,
)
from experiments.report import experiment_parser, finish, output_paths, pyplot, save_figure
from model import GPT, GPTConfig
from optim import Muon

NAME = "gpt_optimizers"
ADAMW = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
SPEEDRUN_ADAM = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
SCALAR_LR = 0.04


@dataclass(frozen=True)
class Contender:
    label: str
    family: str  # adamw | muon | torch_muon
    swept: tuple[str, ...]  # groups whose lr is swept, in sweep order
    start: dict[str, int] = field(default_factory=dict)  # log2 lrs, over the best of `after`
    after: str | None = None
    embed: str = "adam"  # Muon kinds of the embed and head groups
    head: str = "adam"
    ns_coefficients: str = "muon"


CONTENDERS = {
    "adamw": Contender("AdamW", "adamw", ("all",), {"all": -6}),
    "muon": Contender("Muon, embed+head Adam (speedrun)", "muon", ("hidden", "embed", "head"),
                      {"hidden": -6, "embed": -4, "head": -6}),
    "muon_embed_dual": Contender("Muon, embed dual, head Adam", "muon", ("embed", "hidden"),
                                 {"embed": -4}, after="muon", embed="embed"),
    "muon_embed_dual_head_linear": Contender("Muon, embed dual, head Linear", "muon", ("head",),
                                             {"head": -3}, after="muon_embed_dual", embed="embed",
                                             head="head_linear"),
    "muon_embed_dual_head_sign": Contender("Muon, embed dual, head sign", "muon", ("head",),
                                           {"head": 0}, after="muon_embed_dual", embed="embed",
                                           head="head_sign"),
    "muon_polar_express": Contender("Muon (Polar Express), embed+head Adam", "muon", ("hidden",),
                                    after="muon", ns_coefficients="polar_express"),
    "torch_muon": Contender("torch.optim.Muon + AdamW", "torch_muon", ("hidden",), after="muon"),
}
SETTINGS = {
    # 1000 steps × 16 × 128 = 2.05M train tokens of the 4.2M; why this shape: docs/EXPERIMENTS.md
    "full": dict(model=dict(n_layer=2, dim=64, n_head=2, head_dim=32, value_embeds=1), vocab_size=1024,
                 seq_len=128, batch_size=16, steps=1000, eval_every=50, val_tokens=32768, max_extend=3,
                 seeds=[0, 1, 2]),
    "quick": dict(model=dict(n_layer=2, dim=32, n_head=1, head_dim=32, value_embeds=1), vocab_size=256,
                  seq_len=32, batch_size=4, steps=6, eval_every=3, val_tokens=512, max_extend=0,
                  seeds=[0, 1]),
}


def make_optimizers(name: str, model: GPT, lrs: dict[str, float]) -> Optimizers:
    """The optimizers of contender `name` with group lrs `lrs`."""
    contender = CONTENDERS[name]
    if contender.family == "adamw":
        return Optimizers([torch.optim.AdamW(model.parameters(), lr=lrs["all"], **ADAMW)])
    hidden = [p for p in model.blocks.parameters() if p.ndim >= 2]  # the merged q, k, v: (3, d_out, d_in)
    embed = [model.embed.weight, *(table.weight for table in model.value_embeds)]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    head = [model.lm_head.weight]
    if contender.family == "torch_muon":
        muon = torch.optim.Muon([p for p in hidden if p.ndim == 2], lr=lrs["hidden"], weight_decay=0.0,
                                nesterov=True)
        # torch.optim.Muon takes 2-D parameters only: the q, k, v stacks get its update from optim.Muon
        # (bf16 Newton–Schulz, its scale; tests/test_muon.py::test_matches_torch_muon_in_bf16)
        stacks = Muon([dict(params=[p for p in hidden if p.ndim > 2], kind="hidden", lr=lrs["hidden"])],
                      lr_scale="muon", ns_dtype=torch.bfloat16, weight_decay=0.0)
        adam = torch.optim.AdamW([dict(params=embed, lr=lrs["embed"]), dict(params=head, lr=lrs["head"]),
                                  dict(params=scalars, lr=SCALAR_LR)], **SPEEDRUN_ADAM)
        return Optimizers([muon, stacks, adam])
    muon = Muon([dict(params=hidden, kind="hidden", lr=lrs["hidden"]),
                 dict(params=embed, kind=contender.embed, lr=lrs["embed"]),
                 dict(params=head, kind=contender.head, lr=lrs["head"]),
                 dict(params=scalars, kind="adam", lr=SCALAR_LR)],
                lr_scale="muon", ns_coefficients=contender.ns_coefficients, weight_decay=0.0,
                adam_betas=SPEEDRUN_ADAM["betas"], adam_eps=SPEEDRUN_ADAM["eps"])
    return Optimizers([muon])


def run_spec(spec: dict) -> dict:
    """One training run: spec = {"mode", "contender", "log2_lrs", "seed"}; what it gives and its command."""
    settings = SETTINGS[spec["mode"]]
    corpus = _corpus(spec["mode"] == "quick", settings["vocab_size"])
    config = GPTConfig(vocab_size=corpus.vocab_size, max_seq_len=settings["seq_len"],
                       bos_token=corpus.bos, **settings["model"])
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])
        model = GPT(config)
    lrs = {group: 2.0 ** k for group, k in spec["log2_lrs"].items()}
    result = train(model, make_optimizers(spec["contender"], model, lrs), corpus, settings)
    return {"command": run_command(spec), **spec, **result}


@functools.cache
def _corpus(quick: bool, vocab_size: int):
    return stdlib_corpus(quick, vocab_size)


def run_command(spec: dict) -> str:
    lrs = ",".join(f"{group}={k}" for group, k in spec["log2_lrs"].items())
    quick = " --quick" if spec["mode"] == "quick" else ""
    return f"python -m experiments.{NAME}{quick} --run {spec['contender']}:{lrs} --seed {spec['seed']}"


def parse_run(text: str) -> tuple[str, dict[str, int]]:
    """--run CONTENDER:GROUP=K,... → (contender, {group: log2 lr}), checked against the contender."""
    name, _, lrs = text.partition(":")
    if name not in CONTENDERS:
        raise ValueError(f"--run {text!r}: unknown contender {name!r}; use one of {', '.join(CONTENDERS)}")
    try:
        log2_lrs = {group: int(k) for group, k in (item.split("=") for item in lrs.split(","))}
    except ValueError:
        raise ValueError(f"--run {text!r}: expected CONTENDER:GROUP=K,... with integer K (lr 2^K)") from None
    groups = _groups(CONTENDERS[name])
    if set(log2_lrs) != groups:
        raise ValueError(f"--run {text!r}: {name} needs an lr for each of {sorted(groups)}")
    return name, log2_lrs


def _groups(contender: Contender) -> set[str]:
    return {"all"} if contender.family == "adamw" else {"hidden", "embed", "head"}


def sweep_contender(name: str, runner: Runner, mode: str, bests: dict) -> dict:
    """One contender's coordinate sweeps from its start, then its best setting at every seed."""
    settings, contender = SETTINGS[mode], CONTENDERS[name]
    best = dict(bests[contender.after].result()["best_log2_lrs"]) if contender.after else {}
    best.update(contender.start)
    sweeps = {}
    for group in contender.swept:
        seed0 = dict(mode=mode, contender=name, seed=0)
        run_at = functools.partial(_submit_at, runner, seed0, best.copy(), group)
        runs = sweep_log2(run_at, best[group], settings["max_extend"])
        best[group] = min(runs, key=lambda k, runs=runs: (loss_or_inf(runs[k]), k))
        sweeps[group] = [{"log2_lr": k, "final_val_loss": run["final_val_loss"]} for k, run in runs.items()]
        print(f"{name} {group} sweep: {[(k, r['final_val_loss']) for k, r in runs.items()]}", flush=True)
    seeds = [runner.submit(dict(mode=mode, contender=name, log2_lrs=best, seed=s)) for s in settings["seeds"]]
    return {"label": contender.label, "best_log2_lrs": best, "sweeps": sweeps,
            "seeds": [f.result() for f in seeds]}


def _submit_at(runner: Runner, spec: dict, held: dict[str, int], group: str, k: int):
    return runner.submit({**spec, "log2_lrs": {**held, group: k}})


def run(runner: Runner, mode: str, names: list[str], workers: int) -> dict:
    """Every contender of `names` (in dependency order), concurrently when workers > 1; the summary."""
    results: dict = {}
    with ThreadPoolExecutor(len(names) if workers > 1 else 1) as drivers:
        for name in names:
            results[name] = drivers.submit(sweep_contender, name, runner, mode, results)
        contenders = {name: future.result() for name, future in results.items()}
    return {"contenders": contenders, "summary": summarize(contenders)}


def summarize(contenders: dict) -> dict:
    """Per contender, over seeds: final val loss and steps to AdamW's (paired by seed) as mean ± std;
    the paired difference of final val loss from the speedrun split's, where it ran."""
    targets = {run["seed"]: run["final_val_loss"] for run in contenders["adamw"]["seeds"]}
    reference = {run["seed"]: run["final_val_loss"] for run in contenders.get("muon", {}).get("seeds", [])}
    summary = {}
    for name, result in contenders.items():
        finals = [run["final_val_loss"] for run in result["seeds"]]
        steps = [None if targets[run["seed"]] is None
                 else steps_to_reach(run["val_curve"], targets[run["seed"]]) for run in result["seeds"]]
        diffs = [run["final_val_loss"] - reference[run["seed"]] for run in result["seeds"]
                 if reference.get(run["seed"]) is not None and run["final_val_loss"] is not None]
        summary[name] = {
            "final_val_loss": mean_std([f for f in finals if f is not None]),
            "diverged_seeds": sum(f is None for f in finals),
            "steps_to_adamw_final": mean_std([s for s in steps if s is not None]),
            "seeds_reaching_adamw_final": sum(s is not None for s in steps),
            "minus_speedrun_split": mean_std(diffs) if reference else None,
        }
    return summary


def plot(results: dict, path):
    """Sweeps (every group of every contender), seed-mean val curves, and the two scores per contender."""
    plt = pyplot()
    fig, ((sweeps, curves), (finals, steps)) = plt.subplots(2, 2, figsize=(12, 8))
    contenders, summary = results["contenders"], results["summary"]
    colors = dict(zip(contenders, plt.get_cmap("tab10").colors, strict=False))
    styles = {"all": "-", "hidden": "-", "embed": "--", "head": ":"}
    for name, result in contenders.items():
        for group, points in result["sweeps"].items():
            finite = [(p["log2_lr"], p["final_val_loss"]) for p in points if p["final_val_loss"] is not None]
            if finite:
                sweeps.plot(*zip(*finite, strict=True), "o", ls=styles[group], ms=3, color=colors[name],
                            label=f"{name}: {group}")
        runs = result["seeds"]
        steps_axis = [s for s, _ in runs[0]["val_curve"]]
        losses = [[math.nan if v is None else v for _, v in r["val_curve"]] for r in runs]
        curves.plot(steps_axis[1:], [sum(at) / len(at) for at in zip(*losses, strict=True)][1:],
                    color=colors[name], label=result["label"])
    target = summary["adamw"]["final_val_loss"]
    if target is not None:
        curves.axhline(target[0], color="k", ls=":", lw=1, label="AdamW's final (seed mean)")
    names = list(contenders)
    scores = ((finals, "final_val_loss", "final val loss"),
              (steps, "steps_to_adamw_final", "steps to AdamW's final val loss (same seed)"))
    for ax, key, title in scores:
        for i, name in enumerate(names):
            if summary[name][key] is not None:
                mean, std = summary[name][key]
                ax.errorbar(i, mean, yerr=std, fmt="o", capsize=4, color=colors[name])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
        ax.set(title=title, ylabel="mean ± std over seeds")
    sweeps.set(xlabel="log2 lr of the group swept", ylabel="final val loss (seed 0)", title="lr sweeps")
    curves.set(xlabel="step", ylabel="val loss", title="best setting, mean over seeds")
    if target is not None:
        curves.set_ylim(top=target[0] + 1.5)  # the first evaluations, far above, would flatten the rest
    for ax in (sweeps, curves, finals, steps):
        ax.grid(alpha=0.3)
    sweeps.legend(fontsize=6, ncol=2)
    curves.legend(fontsize=7)
    s = results["settings"]
    fig.suptitle(f"GPT n_layer {s['model']['n_layer']}, dim {s['model']['dim']}, {s['steps']} steps of "
                 f"{s['batch_size']}×{s['seq_len']} tokens, stdlib corpus (vocab compacted to "
                 f"{s['vocab_size']}, {100 * results['coverage']:.1f}% of train tokens keep their id)",
                 fontsize=8)
    return save_figure(fig, path)


def with_dependencies(names: list[str]) -> list[str]:
    """`names` with AdamW and every contender they start after, in dependency order."""
    wanted, stack = set(), ["adamw", *names]
    while stack:
        name = stack.pop()
        if name not in CONTENDERS:
            raise ValueError(f"--contenders: unknown contender {name!r}; use some of {', '.join(CONTENDERS)}")
        if name not in wanted:
            wanted.add(name)
            stack += [CONTENDERS[name].after] if CONTENDERS[name].after else []
    return [name for name in CONTENDERS if name in wanted]  # CONTENDERS lists each after its `after`


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = experiment_parser(__doc__)
    parser.add_argument("--workers", type=int, default=1, help="processes running runs at once (default 1)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated contenders (AdamW and those they start after are added)")
    parser.add_argument("--run", default=None, metavar="CONTENDER:GROUP=K,...",
                        help="only one run, at lr 2^K for each group, with --seed; print its final val loss")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        names = with_dependencies(args.contenders.split(","))
        single = parse_run(args.run) if args.run else None
    except ValueError as err:
        parser.error(str(err))
    try:
        corpus = _corpus(args.quick, SETTINGS[mode]["vocab_size"])
    except (PrepareError, ShardError, TokenizerUnavailable) as err:
        raise SystemExit(f"error: {err}") from None
    if single:
        return run_alone(run_spec, dict(mode=mode, contender=single[0], log2_lrs=single[1], seed=args.seed),
                         args.threads)
    paths = output_paths(args, NAME)
    outcome = run_sweep(run_spec, paths[0].with_suffix(".runs.jsonl"), args.workers, args.threads,
                        lambda runner: run(runner, mode, names, args.workers))
    for name, row in outcome["summary"].items():
        print(f"{name:28s} {outcome['contenders'][name]['best_log2_lrs']} {row}")
    results = {"settings": SETTINGS[mode], "coverage": corpus.coverage, **outcome}
    return finish(NAME, argv, args, paths, results, plot)


if __name__ == "__main__":
    main()
