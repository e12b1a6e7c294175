"""Memory per GPU of the GPU presets on W GPUs, with and without --fsdp, from the model and the optimizer.

    python -m bench.memory [--presets 124m 350m 1.5b] [--world-sizes 1 8 16]
                           [--tokens-per-gpu 49152 8192] [--embed-map adam|dual] [--write docs/MEMORY.md]

Nothing is allocated: the model is built on the meta device, and every figure comes from its
parameters' shapes and dtypes, from how the optimizer lays out its state, and from one forward pass on
fake tensors. Columns, for the rank that holds the most (GiB = 2³⁰ bytes):

  parameters   default: every parameter whole, in the dtype GPT.to_device stores it on CUDA (the
               embedding tables in GPTConfig.table_dtype: bf16 for the GPU presets; the rest float32);
               --fsdp: this rank's rows of every parameter (fully_shard's torch.chunk split,
               optim.local_shape), float32 (train_gpt.py shards model.to(device))
  gradients    p.grad, in its parameter's dtype: default whole, --fsdp this rank's rows (float32)
  optimizer    Muon's state on this rank: optim.muon_state_layout on the shapes DataParallel's
               shards (optim.state_shapes) or fully_shard's rows give it, float32 for bf16
               parameters too; the speedrun's param groups (hidden
               matrices: momentum; embeddings, head, scalars: Adam's two moments, or momentum for the
               embeddings with --embed-map dual)
  activations  the tensors autograd keeps for backward in one forward of a micro-batch of
               tokens-per-gpu tokens (one sequence), parameters and buffers excluded, in eager mode
               (torch.compile recomputes some of them in backward, so a compiled step keeps at most
               this; a second table gives the share of vocabulary-wide tensors: head, soft-cap, loss).
               Measured on fake tensors (activation_bytes), with the model's dtypes and autocast as
               train_gpt.py runs it on CUDA; attention counted as FlexAttention keeps it: q, k, v, the
               output and a float32 log-sum-exp per query and head. Default: the model as to_device
               leaves it, autocast off when its tables are bf16 (training.runtime.autocast_dtype), so
               the residual stream is bf16 and each CastedLinear's bf16 cast of its float32 weight,
               made in every forward and saved for backward, is counted here; --fsdp: the parameters
               are fully_shard's gathered bf16 copies under autocast, counted in flight instead
  in flight    buffers besides those, upper bounds from the code. Default, W > 1: DataParallel's
               reduce-scatter rows (a copy of every gradient) and all-gather outputs (a copy of every
               parameter), in the parameters' dtypes, padded as optim/zero.py pads them, kept from
               the first step on.
               --fsdp: the bf16 gathered parameters, their bf16 gradients and the float32 copies
               reduce-scattered (8 bytes an element) of the two largest units of training/fsdp.py (the
               one computing and the one prefetched: embedding tables and head, each its own unit,
               outweigh a block) and of the root's own parameters (fully_shard keeps the root gathered
               from forward through backward); plus optim.fsdp's exchange for the largest stack: six
               float32 buffers of its W·C·c·(d_in) elements (optim.exchange_elements)

The total adds every column, though DataParallel's buffers peak after backward has freed the
activations: an upper bound. Prints markdown tables, one per --tokens-per-gpu; --write replaces what
lies between the markers in that file with them (atomically).
"""

import argparse
import math
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import model.gpt
from data.durable import write_text_atomic
from model import GPT, PRESETS, GPTConfig
from optim import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    exchange_elements,
    local_shape,
    muon_state_layout,
    state_shapes,
    step_collectives,
)
from training.fsdp import sharding_units
from training.recipe import optimizer_groups, parse_config, unused_parameters
from training.runtime import autocast_dtype

GiB = 2**30
BF16, FP32 = 2, 4  # bytes an element
BEGIN, END = "<!-- memory table: python -m bench.memory --write -->", "<!-- end of memory table -->"
COLUMNS = ("parameters", "gradients", "optimizer", "activations", "in flight")
CUDA = torch.device("cuda")  # the device whose dtypes the tables follow; nothing is put on it


def held_gpt(cfg: GPTConfig, fsdp: bool) -> GPT:
    """cfg's GPT with the dtypes train_gpt.py gives it on CUDA, built on the default device: by
    default as GPT.to_device leaves it (tables in cfg.table_dtype, the rest float32); --fsdp: float32,
    as model.to(device) leaves it for fully_shard."""
    gpt = GPT(cfg)
    return gpt if fsdp else gpt.cast_embeddings(cfg.table_dtype(CUDA))


def meta_gpt(cfg: GPTConfig, fsdp: bool) -> GPT:
    with torch.device("meta"):
        return held_gpt(cfg, fsdp)


def speedrun_groups(gpt: GPT, embed_map: str) -> list[dict]:
    """The param groups train_gpt.py --preset speedrun-2025-07-12 --embed-map EMBED_MAP gives Muon
    (training.recipe.optimizer_groups); plain tensors, no names."""
    cfg = parse_config(["--preset", "speedrun-2025-07-12", "--embed-map", embed_map])
    return [{**group, "params": [p for _, p in group["params"]]} for group in optimizer_groups(gpt, cfg)]


def nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def state_bytes(groups: list[dict], shapes: list[list[tuple | None]]) -> int:
    """Σ of muon_state_layout over the parameters this rank keeps state for: shapes[g][i] is the state's
    shape for parameter i of group g on this rank (None: it keeps none)."""
    total = 0
    for group, group_shapes in zip(groups, shapes, strict=True):
        for p, shape in zip(group["params"], group_shapes, strict=True):
            if shape is not None:
                layout = muon_state_layout(p, group["kind"], shape)
                total += sum(nbytes(s, dtype) for s, dtype in layout.values())
    return total


def data_parallel(groups: list[dict], world_size: int, rank: int, flagged: bool = False) -> dict:
    """Parameters, gradients, state and in-flight buffers of one rank under the default distribution;
    flagged: has-a-gradient flags (Muon's unused_parameters, as training.recipe.build_optimizer sets it)."""
    params = [p for group in groups for p in group["params"]]
    held = sum(nbytes(p.shape, p.dtype) for p in params)
    state = state_bytes(groups, state_shapes(groups, rank, world_size))
    return dict(parameters=held, gradients=held, optimizer=state,
                **{"in flight": data_parallel_buffers(groups, world_size, flagged)})


def data_parallel_buffers(groups: list[dict], world_size: int, flagged: bool) -> int:
    """DataParallel's communication buffers (optim/zero.py), made at the first step and kept: per
    collective of step_collectives, a reduce-scatter's W rows sent and row received, an all-gather's
    chunk sent and W chunks received, the flags' all-reduced counts (unused_parameters=True only)."""
    copies = {REDUCE_SCATTER: world_size + 1, ALL_GATHER: world_size + 1, ALL_REDUCE: 1}
    return sum(copies[c.op] * c.bytes for c in step_collectives(groups, world_size, flagged))


def fully_sharded(gpt: GPT, groups: list[dict], world_size: int, rank: int) -> dict:
    """Parameters, gradients, state and in-flight buffers of one rank under --fsdp (float32 rows)."""
    local = [[local_shape(tuple(p.shape), rank, world_size) for p in group["params"]] for group in groups]
    held = sum(nbytes(shape, torch.float32) for shapes in local for shape in shapes)
    units = sorted(sum(p.numel() for p in unit.parameters()) for unit in sharding_units(gpt))
    root = sum(p.numel() for p in gpt.parameters()) - sum(units)
    gathered = (root + sum(units[-2:])) * (BF16 + BF16 + FP32)
    return dict(parameters=held, gradients=held, optimizer=state_bytes(groups, local),
                **{"in flight": gathered + exchange_bytes(groups, world_size)})


def exchange_bytes(groups: list[dict], world_size: int) -> int:
    """Six float32 buffers of the largest stack's owner exchange (optim.exchange_elements)."""
    return 6 * max(exchange_elements(groups, world_size), default=0) * FP32


class FlexSaved(torch.autograd.Function):
    """Stands in for FlexAttention: keeps what its backward keeps (q, k, v, out, log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("bench.memory only measures the forward")


def activation_bytes(cfg: GPTConfig, tokens: int, fsdp: bool) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves in one forward of one sequence, parameters and
    buffers excluded: "all", and "logits" for those as wide as the vocabulary (head, soft-cap, loss).

    On fake tensors (shapes and dtypes, no memory), with the dtypes train_gpt.py's forward has on CUDA:
    the held model's (held_gpt) by default, bf16 parameters under --fsdp, as fully_shard's
    MixedPrecisionPolicy gathers them; under bf16 autocast where training.runtime.autocast_dtype puts
    the held model on CUDA (CPU autocast's op lists stand in for CUDA's: both cast matmuls to bf16).
    """
    autocast = autocast_dtype(meta_gpt(cfg, fsdp), CUDA)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if fsdp else dtype)
    try:
        computing = meta_gpt(cfg, fsdp)
    finally:
        torch.set_default_dtype(dtype)
    if tokens > cfg.max_seq_len:
        raise SystemExit(f"--tokens-per-gpu {tokens}: one sequence of at most {cfg.max_seq_len}")
    with FakeTensorMode():
        # CPU fake tensors of the meta model's shapes and dtypes, in place of its tensors for the forward
        tensors = {name: torch.empty(t.shape, dtype=t.dtype, requires_grad=t.requires_grad)
                   for name, t in [*computing.named_parameters(), *computing.named_buffers()]}
        persistent = {t.untyped_storage()._cdata for t in tensors.values()}
        saved: dict[int, tuple[int, bool]] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in persistent:
                saved[storage._cdata] = (storage.nbytes(), tensor.shape[-1:] == (cfg.vocab_size,))
            return tensor

        idx = torch.zeros(1, tokens, dtype=torch.long)
        flex = mock.patch.object(model.gpt, "attend", lambda backend, q, k, v, *_: FlexSaved.apply(q, k, v))
        no_mask = mock.patch.object(model.gpt, "build_mask", lambda *args: None)
        precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None)
        with flex, no_mask, precision, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            torch.func.functional_call(computing, tensors, (idx, idx))
    return dict(all=sum(size for size, _ in saved.values()),
                logits=sum(size for size, logits in saved.values() if logits))


def rows(presets: list[str], world_sizes: list[int], tokens: int, embed_map: str) -> list[dict]:
    """One row per preset, W and --fsdp or not: the largest rank's bytes by column."""
    table = []
    for preset in presets:
        cfg = PRESETS[preset]
        gpts = {fsdp: meta_gpt(cfg, fsdp) for fsdp in (False, True)}
        groups = {fsdp: speedrun_groups(gpt, embed_map) for fsdp, gpt in gpts.items()}
        activations = {fsdp: activation_bytes(cfg, tokens, fsdp) for fsdp in (False, True)}
        for world_size in world_sizes:
            for fsdp in (False, True):
                per_rank = [fully_sharded(gpts[fsdp], groups[fsdp], world_size, r) if fsdp
                            else data_parallel(groups[fsdp], world_size, r, unused_parameters(gpts[fsdp]))
                            for r in range(world_size)]
                largest = max(per_rank, key=lambda held: sum(held.values()))
                table.append(dict(preset=preset, world_size=world_size, fsdp=fsdp, **largest,
                                  activations=activations[fsdp]["all"], logits=activations[fsdp]["logits"]))
    return table


def markdown(table: list[dict], tokens: int, embed_map: str) -> str:
    """The memory table, then the logits' share of the activations per preset."""
    embeddings = "Adam" if embed_map == "adam" else "the embed map"
    lines = [f"Per GPU, GiB; activations of a {tokens:,}-token micro-batch; embeddings: {embeddings}.", "",
             "| preset | W | --fsdp | parameters | gradients | optimizer state | activations | in flight "
             "| total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        figures = [row[column] / GiB for column in COLUMNS]
        cells = " | ".join(f"{x:.2f}" for x in [*figures, sum(figures)])
        fsdp = "yes" if row["fsdp"] else "no"
        lines.append(f"| {row['preset']} | {row['world_size']} | {fsdp} | {cells} |")
    lines += ["", "Activations per token, KiB (eager), and the part in vocabulary-wide tensors (head, "
              "soft-cap, loss):", "",
              "| preset | --fsdp | per token | vocabulary-wide |", "|---|---|---|---|"]
    shares = {(row["preset"], row["fsdp"]): row for row in table}
    for (preset, fsdp), row in shares.items():
        per_token, logits = row["activations"] / tokens / 1024, row["logits"] / tokens / 1024
        lines.append(f"| {preset} | {'yes' if fsdp else 'no'} | {per_token:.1f} | {logits:.1f} |")
    return "\n".join(lines) + "\n"


def write_between_markers(path: Path, text: str) -> None:
    """Replace what lies between BEGIN and END in `path` with `text`, via a temporary file and a rename."""
    document = path.read_text()
    if BEGIN not in document or END not in document:
        raise SystemExit(f"--write {path}: expected the markers {BEGIN} and {END} in it")
    head, rest = document.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    write_text_atomic(path, f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["124m", "350m", "1.5b"], choices=sorted(PRESETS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--tokens-per-gpu", nargs="+", type=int, default=[48 * 1024, 8 * 1024],
                        help="micro-batch tokens per GPU, one sequence (48k: the speedrun's); a table each")
    parser.add_argument("--embed-map", choices=("adam", "dual"), default="adam")
    parser.add_argument("--write", type=Path, help="a markdown file holding the table's markers")
    args = parser.parse_args(argv)
    tables = [markdown(rows(args.presets, args.world_sizes, tokens, args.embed_map), tokens, args.embed_map)
              for tokens in args.tokens_per_gpu]
    text = "\n".join(tables)
    print(text, end="")
    if args.write:
        write_between_markers(args.write, text)


if __name__ == "__main__":
    main()
