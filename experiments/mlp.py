"""The bias-free ReLU MLP of the width, depth and stable-rank experiments, in its two set-ups.

    f(x) = W_L·relu(W_{L-1}·relu(… relu(W_1·x))),   W_l of shape (d_out, d_in), no biases.

dual:      W_l starts as √(d_out/d_in)·(a random semi-orthogonal matrix), so its RMS→RMS norm is 1,
           and steps by lr·√(d_out/d_in)·U Vᵀ of its gradient G = U Σ Vᵀ: dualized SGD, which is
           optim.Muon with momentum 0 and lr_scale "spectral" (U Vᵀ by 5 Newton–Schulz steps);
           optionally each layer's lr is scaled by its modular-norm share (experiments.modular);
standard:  PyTorch's default init, W ~ U(±1/√d_in) (standard parameterization), trained by
           torch.optim.Adam (betas 0.9, 0.999) with one lr for every layer.
Both decay the lr linearly to 0 over the run and draw minibatches uniformly with replacement.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from experiments.datasets import Classification
from experiments.modular import chain, modular_groups
from optim import Muon


def mlp(d_in: int, width: int, d_out: int, depth: int = 3) -> nn.Sequential:
    """`depth` bias-free Linear layers d_in → width → … → width → d_out with ReLUs between."""
    if depth < 2:
        raise ValueError(f"depth must be >= 2 (an input and an output layer), got {depth}")
    layers: list[nn.Module] = [nn.Linear(d_in, width, bias=False)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), nn.Linear(width, width, bias=False)]
    layers += [nn.ReLU(), nn.Linear(width, d_out, bias=False)]
    return nn.Sequential(*layers)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def orthogonal_init_(model: nn.Module) -> nn.Module:
    """W ← √(d_out/d_in)·Q with Q random semi-orthogonal: every singular value √(d_out/d_in)."""
    for layer in linear_layers(model):
        d_out, d_in = layer.weight.shape
        nn.init.orthogonal_(layer.weight)
        layer.weight.mul_(math.sqrt(d_out / d_in))
    return model


def build(task: Classification, width: int, depth: int, setup: str, seed: int) -> nn.Sequential:
    """The MLP for `task`, initialized for `setup` ("dual": orthogonal, "standard": PyTorch's)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = mlp(task.d_in, width, task.n_classes, depth)
        return orthogonal_init_(model) if setup == "dual" else model


def dual_sgd(model: nn.Module, lr: float, modular: bool = False) -> Muon:
    """Dualized SGD: W_l ← W_l − lr_l·√(d_out/d_in)·U Vᵀ, lr_l = lr, or lr·(share of layer l) if modular.

    The shares come from the chain of the model's Linear layers (mass 1 each) joined by ReLUs
    (sensitivity 1): 1/depth per layer.
    """
    params = {f"w{i}": [layer.weight] for i, layer in enumerate(linear_layers(model))}
    if modular:
        groups = modular_groups(params, chain(params), lr, kind="hidden")
    else:
        groups = [{"params": weights, "lr": lr, "kind": "hidden"} for weights in params.values()]
    return Muon(groups, momentum=0.0, nesterov=False, lr_scale="spectral")


def adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=lr)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, task: Classification, steps: int,
          batch_size: int, seed: int) -> dict[str, float]:
    """Minimize the cross-entropy for `steps` steps, lr decaying linearly to 0; return `evaluate`.

    A run whose minibatch loss turns NaN or inf stops there and reports NaN losses (diverged).
    """
    gen = torch.Generator().manual_seed(seed)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    for step in range(steps):
        batch = torch.randint(len(task.y_train), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(task.x_train[batch]), task.y_train[batch])
        if not torch.isfinite(loss):
            return {"train_loss": math.nan, "test_loss": math.nan, "test_accuracy": math.nan}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr * (1 - step / steps)
        optimizer.step()
    return evaluate(model, task)


@torch.no_grad()
def evaluate(model: nn.Module, task: Classification) -> dict[str, float]:
    """Cross-entropy on the whole train set, and cross-entropy and accuracy on the test set."""
    test_logits = model(task.x_test)
    return {
        "train_loss": F.cross_entropy(model(task.x_train), task.y_train).item(),
        "test_loss": F.cross_entropy(test_logits, task.y_test).item(),
        "test_accuracy": (test_logits.argmax(1) == task.y_test).float().mean().item(),
    }
