"""bench.memory's default rows (no --fsdp) hold what train_gpt.py's model holds on CUDA after
GPT.to_device: embedding tables and their gradients in the config's CUDA dtype (bf16 for the GPU presets),
the rest float32, and float32 optimizer state for every parameter, bf16 ones included."""

import dataclasses
from unittest import mock

import pytest
import torch

import model.gpt
from bench.memory import FlexSaved, activation_bytes, data_parallel, meta_gpt, speedrun_groups
from model import GPT, GPTConfig
from optim import Muon
from training.runtime import autocast_dtype

# A tiny GPT with the GPU presets' bf16 tables; values scaled in every block, so that every parameter
# gets a gradient, hence optimizer state.
CFG = GPTConfig(vocab_size=60, n_layer=4, n_head=2, head_dim=8, dim=16, max_seq_len=16, value_embeds=1,
                value_lambda_all_layers=True, cuda_dtype="bfloat16")


def placed_on_cuda(cfg: GPTConfig) -> GPT:
    """A real CPU model with the dtypes GPT.to_device gives it on CUDA (off CUDA it keeps them float32)."""
    torch.manual_seed(0)
    return GPT(cfg).cast_embeddings(cfg.table_dtype("cuda"))


def held_after_one_step(gpt: GPT, embed_map: str) -> dict[str, int]:
    """Bytes of the parameters, their gradients and the optimizer state after one step of one process."""
    optimizer = Muon(speedrun_groups(gpt, embed_map), lr=0.01)
    idx = torch.randint(CFG.vocab_size, (2, CFG.max_seq_len))
    gpt(idx, idx).backward()
    optimizer.step()
    params = list(gpt.parameters())
    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    return dict(parameters=sum(p.nbytes for p in params), gradients=sum(p.grad.nbytes for p in params),
                optimizer=sum(t.nbytes for t in state))


def test_the_tables_are_bf16_on_cuda_for_this_config():
    assert CFG.table_dtype("cuda") == torch.bfloat16  # else the tests below could not tell fp32 from bf16


@pytest.mark.parametrize("embed_map", ["adam", "dual"])
def test_the_default_rows_predict_the_bytes_of_a_model_placed_by_to_device(embed_map):
    groups = speedrun_groups(meta_gpt(CFG, fsdp=False), embed_map)
    predicted = data_parallel(groups, world_size=1, rank=0)
    assert {key: predicted[key] for key in ("parameters", "gradients", "optimizer")} == \
        held_after_one_step(placed_on_cuda(CFG), embed_map)


def test_a_float32_config_keeps_every_default_parameter_in_float32():
    cfg = dataclasses.replace(CFG, cuda_dtype="float32")
    assert {p.dtype for p in meta_gpt(cfg, fsdp=False).parameters()} == {torch.float32}


def saved_bytes_of_a_real_forward(gpt: GPT, tokens: int) -> int:
    """Bytes of the distinct storages autograd saves in one real forward of one sequence, parameters and
    buffers excluded, with attention standing in for FlexAttention as bench.memory counts it."""
    persistent = {t.untyped_storage()._cdata for t in [*gpt.parameters(), *gpt.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in persistent:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    idx = torch.randint(gpt.config.vocab_size, (1, tokens))
    flex = mock.patch.object(model.gpt, "attend", lambda backend, q, k, v, *_: FlexSaved.apply(q, k, v))
    no_mask = mock.patch.object(model.gpt, "build_mask", lambda *args: None)
    with flex, no_mask, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        gpt(idx, idx)
    return sum(saved.values())


def test_the_default_activations_are_those_a_real_forward_of_the_placed_model_saves():
    real = placed_on_cuda(CFG)
    assert autocast_dtype(real, torch.device("cuda")) is None  # as train_gpt.py runs bf16 tables: no autocast
    predicted = activation_bytes(CFG, CFG.max_seq_len, fsdp=False)["all"]
    assert predicted == saved_bytes_of_a_real_forward(real, CFG.max_seq_len)
