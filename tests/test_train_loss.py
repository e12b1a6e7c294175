"""GPTConfig.train_loss "sum_bf16" (record #37 on): in training, the cross-entropy of bf16 logits summed
over the tokens, a bf16 scalar; its value and gradients are B*T times the float32 mean's, within bf16's
rounding; evaluation keeps the float32 mean."""

import dataclasses

import pytest
import torch
from conftest import TINY_GPT2, random_gpt

from model import GPTConfig

CFG = dataclasses.replace(TINY_GPT2, vocab_size=256)
B, T = 2, 32
TOKENS = B * T
# bf16 keeps 8 significant bits (half-ulp 2^-8). Each token's loss is log-softmax of bf16 logits, rounded
# (2^-8 of |z| + |logsumexp|, about 3x the loss here), and CPU's nll_loss adds the tokens in cascaded
# bf16 partial sums (two levels at 64 tokens, then the total): about 6 roundings of 2^-8 in all, 2^-5
# with margin. Measured 1.6e-3 relative. A mean instead of a sum is off by 64x.
LOSS_RTOL = 2.0**-5
# A logit's gradient p - onehot is computed from bf16 logits: each rounded to 2^-9 of its size, up to 30
# here, which moves p by up to ~6% relative on a few entries, then the soft-cap's slope in bf16 (2^-8).
# Over a whole gradient (relative Frobenius distance) measured 0.4% (tanh) and 0.9% (the record's
# sigmoid), for the head's output and for every parameter together; 2^-5 leaves 3x margin.
GRAD_RTOL = 2.0**-5


def models(**options) -> tuple:
    """(the sum_bf16 model, the mean_fp32 model) with the same random weights, in training mode."""
    summed = random_gpt(dataclasses.replace(CFG, train_loss="sum_bf16", **options)).train()
    mean = random_gpt(dataclasses.replace(CFG, **options)).train()
    return summed, mean


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (B, T), generator=gen), torch.randint(0, 256, (B, T), generator=gen)


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F."""
    return ((a - b).norm() / b.norm()).item()


def head_output_gradient(model, idx, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss, its gradient with respect to the head's output z, before the soft-cap)."""
    outputs = []
    hook = model.lm_head.register_forward_hook(lambda module, args, z: outputs.append(z) or z.retain_grad())
    loss = model(idx, targets)
    loss.backward()
    hook.remove()
    return loss, outputs[0].grad


@pytest.mark.parametrize("softcap", ["tanh", "sigmoid_unscaled"])
def test_the_training_loss_is_the_bf16_sum_of_the_tokens_cross_entropy(softcap):
    summed, mean = models(head_softcap=softcap)
    idx, targets = batch()
    loss_sum, loss_mean = summed(idx, targets), mean(idx, targets)
    assert loss_sum.dtype == torch.bfloat16 and loss_mean.dtype == torch.float32
    torch.testing.assert_close(loss_sum.double(), TOKENS * loss_mean.double(), rtol=LOSS_RTOL, atol=0)


def test_its_gradients_are_the_means_times_the_tokens_and_reach_the_head_in_bf16():
    summed, mean = models(head_softcap="sigmoid_unscaled")
    idx, targets = batch()
    _, dz_sum = head_output_gradient(summed, idx, targets)
    _, dz_mean = head_output_gradient(mean, idx, targets)
    # The cross-entropy and soft-cap ran in bf16: every gradient that reaches z is a bf16 value.
    assert torch.equal(dz_sum, dz_sum.bfloat16().float())
    assert relative_distance(dz_sum, TOKENS * dz_mean) <= GRAD_RTOL
    every_sum, every_mean = (torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (summed, mean))
    assert relative_distance(every_sum, TOKENS * every_mean) <= GRAD_RTOL


def test_evaluation_returns_the_float32_mean_whatever_the_training_loss():
    summed, mean = models()
    idx, targets = batch()
    assert torch.equal(summed.eval()(idx, targets), mean.eval()(idx, targets))


def test_an_unknown_training_loss_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"GPTConfig.train_loss must be one of \('mean_fp32', 'sum_bf16'\)"):
        GPTConfig(train_loss="sum_fp32")
