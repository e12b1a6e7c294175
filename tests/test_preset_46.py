"""`--preset speedrun`, record #46's recipe: its model (model/gpt.py PRESETS["124m-46"]) has the record's
tensors, and its optimizer steps each of them as the record's does (kind, lr, options).

The expected values are our own tables, written from the record's main body: its DistAdam (lr 0.008,
betas (0.65, 0.95), eps 1e-8, wd 0, lr_mul 75 on the embeddings, 1 on the head, 5 on the scalars,
stepped on odd steps) and its NorMuon (lr 0.023, momentum 0.95, beta2 0.95, wd 1.2 cautious inside the
update, step size lr * lr_mul * sqrt(max(1, rows / cols)) of the stored shape, c_fc lr_mul 2).
"""

import dataclasses

import pytest
import torch

from model import GPT, PRESETS
from optim import LR_SCALES
from training import recipe

ATTENTION = [i for i in range(12) if i not in (0, 7)]  # the record's blocks with attention
MLP = range(1, 12)  # and with an MLP
TABLE = (50304, 768)


def record_shapes() -> dict[str, tuple]:
    """Our parameters of record #46's model, full size, one for one with its tensors: embed, 3
    value_embeds and lm_head (50304, 768); smear_gate (1, 12); per attention block qkvo_w (768, 3072)
    as q, k, v (3, 768, 768) and o (768, 768), attn_gate (6, 12); per MLP c_fc and c_proj (768, 3072),
    our fc (d_out, d_in) = c_fc transposed; the scalars it reads (tests/test_model_46.py)."""
    shapes = {"embed.weight": TABLE, "lm_head.weight": TABLE, "smear.gate.weight": (1, 12),
              "smear.lambdas": (1,), "skip_weights": (1,), "backout_lambda": (1,)}
    shapes |= {f"value_embeds.{j}.weight": TABLE for j in range(3)}
    for i in ATTENTION:
        shapes |= {f"blocks.{i}.attn.qkv.weight": (3, 768, 768), f"blocks.{i}.attn.o.weight": (768, 768),
                   f"blocks.{i}.attn.gate.weight": (6, 12), f"blocks.{i}.attn.value_lambdas": (2,)}
    for i in MLP:
        shapes |= {f"blocks.{i}.mlp.fc.weight": (3072, 768), f"blocks.{i}.mlp.proj.weight": (768, 3072),
                   f"blocks.{i}.lambdas": (2,)}
    return shapes


def test_the_46_model_preset_has_the_records_tensors():
    with torch.device("meta"):
        model = GPT(PRESETS["124m-46"])
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == record_shapes()


# The record's step for each of its tensors, by our parameter name: (kind, lr, step size factor, options).
# The factor is the record's lr_mul * sqrt(max(1, rows / cols)) of its stored shape: qkvo_w and c_proj
# (768, 3072): 1; c_fc (768, 3072) with lr_mul 2: 2; the gates (1, 12), (6, 12): 1.
NORMUON = dict(beta2=0.95, weight_decay=1.2, wd_form="in_update", cautious_wd=True, step_every=1,
               momentum=0.95, ns_coefficients="polar_express_speedrun", ns_eps=1e-6,
               ns_rounding="fused", lr_mul=1.0)
ADAM = dict(momentum=0.65, beta2=0.95, eps=1e-8, eps_form="raw", weight_decay=0.0, step_every=2,
            lr_mul=1.0)
STEPS = {
    "qkv": ("hidden", 0.023, 1.0, NORMUON | dict(normuon="column")),
    "o": ("hidden", 0.023, 1.0, NORMUON | dict(normuon="column")),
    "fc": ("hidden", 0.023, 2.0, NORMUON | dict(normuon="auto")),
    "proj": ("hidden", 0.023, 1.0, NORMUON | dict(normuon="auto")),
    "gate": ("hidden", 0.023, 1.0, NORMUON | dict(normuon="auto")),
    "embedding": ("adam", 0.008 * 75, 1.0, ADAM),
    "head": ("adam", 0.008 * 1, 1.0, ADAM),
    "scalar": ("adam", 0.008 * 5, 1.0, ADAM),
}


def record_tensor(name: str) -> str:
    """Which of STEPS' entries the record steps our parameter `name` as."""
    if name.startswith(("embed.", "value_embeds.")):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    if name.endswith("gate.weight"):
        return "gate"
    if name.endswith(".weight"):
        return name.split(".")[-2]  # qkv, o, fc, proj
    return "scalar"


@pytest.fixture(scope="module")
def speedrun_optimizer():
    """The preset's optimizer over the preset's model at full size, on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(PRESETS["124m-46"])
    optimizer = recipe.build_optimizer(model, recipe.parse_config(["--preset", "speedrun"]))
    names = {id(p): name for name, p in model.named_parameters()}
    return [(names[id(p)], p, group) for group in optimizer.param_groups for p in group["params"]]


def test_the_speedrun_optimizer_steps_every_tensor_as_record_46(speedrun_optimizer):
    assert sorted(name for name, _, _ in speedrun_optimizer) == sorted(record_shapes())
    for name, p, group in speedrun_optimizer:
        kind, lr, factor, options = STEPS[record_tensor(name)]
        assert group["kind"] == kind and group["lr"] == pytest.approx(lr, rel=1e-12), name
        for key, want in options.items():  # numbers to 1e-12 relative: 0.008 * 75 is 0.6000000000000001
            want = pytest.approx(want, rel=1e-12) if isinstance(want, float) else want
            assert group[key] == want, (name, key)
        if kind == "hidden":  # our step size: lr times the lr_scale of each (d_out, d_in) matrix
            scale = LR_SCALES[group["lr_scale"]](*p.shape[-2:])
            assert scale == pytest.approx(factor, rel=1e-12), name


def test_normuon_puts_attention_mlp_and_gates_in_groups_of_their_own(speedrun_optimizer):
    families = {}
    for name, _, group in speedrun_optimizer:
        if group["kind"] == "hidden":
            families.setdefault(id(group), set()).add(recipe.hidden_family(name))
    assert sorted(map(sorted, families.values())) == [["attn"], ["gates"], ["mlp"]]


def test_normuon_refuses_a_hidden_matrix_it_has_no_axis_for():
    with pytest.raises(ValueError, match="--normuon: no NorMuon axis for the hidden matrix head.w.weight"):
        recipe.hidden_family("head.w.weight")


def test_normuon_beta2_reaches_the_hidden_groups_and_adam_keeps_its_own():
    flags = ["--normuon-beta2", "0.9", "--adam-betas", "0.6", "0.99"]
    cfg = recipe.parse_config(["--preset", "speedrun", *flags])
    model = GPT(dataclasses.replace(PRESETS["124m-46"], vocab_size=64, dim=24, n_head=2, head_dim=12,
                                    max_seq_len=32))
    beta2 = {group["kind"]: group["beta2"] for group in recipe.build_optimizer(model, cfg).param_groups}
    assert beta2 == {"hidden": 0.9, "adam": 0.99}


def test_the_speedrun_moves_adam_parameters_on_odd_steps_only():
    # Record #46 steps DistAdam on odd steps, on two steps' gradients: at step 0 no Adam parameter moves,
    # at step 1 the head does (zero-initialized, it alone has a gradient at first). Width 24, 2 layers'
    # worth of cost: a 64-token vocabulary, 32 tokens.
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(PRESETS["124m-46"], vocab_size=64, dim=24, n_head=2, head_dim=12,
                                    max_seq_len=32))
    optimizer = recipe.build_optimizer(model, recipe.parse_config(["--preset", "speedrun"]))
    adam = {id(p) for g in optimizer.param_groups if g["kind"] == "adam" for p in g["params"]}
    idx = torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(1))
    moved = []
    for _ in range(2):
        before = {name: p.detach().clone() for name, p in model.named_parameters() if id(p) in adam}
        model(idx[:, :-1], idx[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
        moved.append({name for name, p in model.named_parameters() if id(p) in adam
                      and not torch.equal(p, before[name])})
    assert moved[0] == set() and "lm_head.weight" in moved[1]


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_each_stage_sums_the_records_tokens_per_gpu_on_8_gpus_and_validates_one_row(gpus):
    # The summed loss's gradient is c times the mean's, c = the tokens of a micro-batch (rows x 16384);
    # the record's c is its tokens per GPU, tokens / 8, in every stage (docs/MATH.md 4.8). On 8 GPUs each
    # stage is one micro-batch of 1, 2, 3 rows: c = 16384, 32768, 49152, so eps 1e-8 and 1e-6 are the
    # record's. Validation: one 262144-token row per micro-batch on any number of GPUs, as the record's.
    cfg = recipe.parse_config(["--preset", "speedrun"])
    for tokens in cfg.tokens_schedule:
        layout = recipe.batch_layout(dataclasses.replace(cfg, tokens_per_step=tokens), gpus)
        c = layout.micro_batch * cfg.seq_len
        if gpus == 8 or tokens > 131072:  # fewer GPUs, first stage: 2 rows of 8 a micro-batch, c twice
            assert c == tokens // 8, (gpus, tokens, layout)
        else:
            assert c == 2 * tokens // 8, (gpus, tokens, layout)
        assert layout.val_batch == 1


def test_documents_cut_to_2048_exclude_bos_aligned_sequences(capsys):
    cfg = recipe.parse_config(["--preset", "speedrun"])
    assert (cfg.max_doc_len, cfg.align_to_bos) == (2048, False)
    with pytest.raises(SystemExit):
        recipe.parse_config(["--preset", "speedrun", "--align-to-bos"])
    error = capsys.readouterr().err
    assert "--max-doc-len 2048 packs rows from whole documents" in error and error.count("\n") == 1
