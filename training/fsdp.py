"""--fsdp: the GPT sharded over the processes with PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard).

Each unit below becomes one fully_shard group: its parameters are stored as float32 row shards, one
per process (DTensors, 1/W of the rows each), all-gathered just before the unit computes and freed
after, and its gradients are reduce-scattered back into row shards as soon as backward is done with
it. The units are each embedding table, each block and the LM head; the model itself is the root,
holding what is left (the skip weights). Giving the tables and the head units of their own keeps
them out of the root, whose parameters fully_shard keeps gathered from forward to backward.

On CUDA the gathered parameters are bf16 for compute and gradients are reduced in float32
(MixedPrecisionPolicy); on a CPU everything stays float32. optim.Muon takes the sharded parameters
as they are (optim/fsdp.py). Gradients are reduce-scattered after every micro-batch's backward, so no
rank ever holds a whole unsharded gradient across micro-batches.
"""

import torch
from torch import nn

from model import GPT


def sharding_units(model: GPT) -> list[nn.Module]:
    """The modules fully_shard wraps, in the order it wraps them; the model (the root) comes after."""
    return [model.embed, *model.value_embeds, *model.blocks, model.lm_head]


def shard(model: GPT, device: torch.device) -> GPT:
    """fully_shard every unit and then the model over all processes (the default process group)."""
    # Imported here: FSDP's modules take a while to import, and only --fsdp needs them.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(device)
    for unit in sharding_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def mixed_precision(device: torch.device):
    """fully_shard's MixedPrecisionPolicy: on CUDA, parameters all-gathered in bf16 (the compute dtype)
    and gradients reduce-scattered in float32; elsewhere float32 throughout (no casts)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()
