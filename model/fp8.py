"""The LM head's FP8 matmul, as the 2025-07-12 record and record #46 compute it in training.

For x (M, K) and W (N, K) (W float32, the optimizer's copy), with fixed scales s_x, s_w, s_g:

  forward    x8 = e4m3(x / s_x),  W8 = e4m3(W / s_w)
             y  = bf16(s_x s_w · x8 W8^T)                        (M, N) bfloat16
  backward   g8 = e5m2(dy / s_g)
             dx = bf16(s_g s_w · g8 W8)                          (M, K) bfloat16
             dW = float32(s_x s_g · x8^T g8)^T                   (N, K) float32

e4m3 (float8_e4m3fn: 3 mantissa bits, normals 2^-6 .. 448) holds the forward operands, e5m2 (2 mantissa
bits, normals 2^-14 .. 57344: less precision, more range) the output gradient. Each quotient is
computed in float32 and rounded to nearest once, when cast: a relative error of at most 2^-4 (e4m3) or
2^-3 (e5m2) for a normal value. Products are exact and summed in float32 (torch._scaled_mm; the
forward with the fast, lower-precision accumulation on H100, as the record), then rounded once more to
the output dtype. The backward reuses the forward's x8 and W8, saved at one byte per element.

The scales (head_scales) are the records', chosen so that nothing reaches a format's largest value:
an RMS-normed row has |x_i| <= sqrt(K), so x / s_x with s_x = sqrt(K)/448 lies in e4m3's ±448; s_g =
1/448 for the records' loss, a sum over each GPU's tokens (1/(448 rows) for our mean, the same e5m2
values). s_w is the one that differs (WEIGHT_SCALES, GPTConfig.fp8_weight_scale): the 2025-07-12
record's 24/448 holds weights up to |W| = 24 and keeps 3 mantissa bits down to 24/448 · 2^-6 = 8.4e-4;
record #46's 2^-9 holds only |W| <= 448 · 2^-9 = 0.875 (a larger weight does not fit in e4m3), but
keeps 3 mantissa bits down to 2^-15 = 3.1e-5: 1/27 of the range, 27× finer for small weights.
"""

import functools
import math

import torch
from torch import Tensor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX = torch.finfo(E4M3).max  # 448
# The records' w_s: the 2025-07-12 record's holds head weights up to |W| = 24, record #46's up to 0.875.
WEIGHT_SCALES = {"2025-07-12": 24.0 / E4M3_MAX, "2025-11-29": 2.0**-9}


def head_scales(dim: int, rows: int, w_s: float = WEIGHT_SCALES["2025-07-12"],
                summed: bool = False) -> tuple[float, float, float]:
    """The records' (s_x, s_w, s_g) for a head over dim-wide RMS-normed rows, s_w = w_s.

    s_x = sqrt(dim)/448 as the records. Their s_g = 1/448 scales the gradient of a loss summed over
    the rows (summed: GPTConfig.train_loss "sum_bf16"). Our default loss is the mean over the `rows`
    rows of the micro-batch, so its gradient is 1/rows of that and s_g = 1/(448 rows) puts the same
    numbers into e5m2 (with gradient accumulation over n micro-batches both sit log2(n) binades lower,
    as the records' loss is divided by n too).
    """
    return math.sqrt(dim) / E4M3_MAX, w_s, 1.0 / E4M3_MAX if summed else 1.0 / (E4M3_MAX * rows)


def quantize(t: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """dtype(t / scale), the quotient in float32, rounded to nearest once."""
    return t.float().div(scale).to(dtype)


def scale_tensor(t: Tensor, scale: float) -> Tensor:
    """A scale as _scaled_mm takes it: a 0-dim float32 tensor on t's device."""
    return t.new_tensor(scale, dtype=torch.float32)


def fp8_forward(x: Tensor, w: Tensor, x_s: float, w_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, x8, W8) of the module docstring's forward; W8^T is column-major, as _scaled_mm needs."""
    x8, w8 = quantize(x, x_s, E4M3), quantize(w, w_s, E4M3)
    y = torch._scaled_mm(x8, w8.T, scale_a=scale_tensor(x, x_s), scale_b=scale_tensor(x, w_s),
                         out_dtype=torch.bfloat16, use_fast_accum=True)
    return y, x8, w8


def fp8_backward(dy: Tensor, x8: Tensor, w8: Tensor, x_s: float, w_s: float,
                 grad_s: float) -> tuple[Tensor, Tensor]:
    """(dx, dW) of the module docstring's backward. Each right operand is column-major (.T.contiguous().T);
    dW is computed as (x8^T g8)^T, the record's faster order for (N, K) = (50304, 768)."""
    g8 = quantize(dy, grad_s, E5M2)
    dx = torch._scaled_mm(g8, w8.T.contiguous().T, scale_a=scale_tensor(dy, grad_s),
                          scale_b=scale_tensor(dy, w_s), out_dtype=torch.bfloat16)
    dw = torch._scaled_mm(x8.T.contiguous(), g8.T.contiguous().T, scale_a=scale_tensor(dy, x_s),
                          scale_b=scale_tensor(dy, grad_s), out_dtype=torch.float32).T
    return dx, dw


# Custom ops: torch.compile(fullgraph=True) keeps each as one opaque node (the fake kernels give it
# shapes, dtypes and strides), so the model's graph never traces float8 autograd. An autograd.Function
# would trace too, but would leave inductor to lower the mixed e5m2 x e4m3 _scaled_mm and the saved
# float8 tensors, which no CPU test can check; the custom op is the form the record ran on H100. On
# CUDA each op runs compiled, fusing each scale with its cast: eagerly, the (M, N) gradient (4.9 GB in
# bf16 at the speedrun's 49152 x 50304) would make three extra passes through memory.
@torch.library.custom_op("speedrun::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """y = x W^T in FP8 (module docstring); returns (y, x8, W8), the last two saved for the backward."""
    return fp8_forward(x, w, x_s, w_s)


@torch.library.custom_op("speedrun::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(dy: Tensor, x8: Tensor, w8: Tensor, x_s: float, w_s: float,
                    grad_s: float) -> tuple[Tensor, Tensor]:
    """(dx, dW) from dy and the forward's saved x8, W8 (module docstring)."""
    return fp8_backward(dy, x8, w8, x_s, w_s, grad_s)


@functools.cache
def compiled_on_first_call(fn):
    """torch.compile(fn), made at the first call: importing the model does not import the compiler."""
    return torch.compile(fn)


def fp8_mm_cuda(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    return compiled_on_first_call(fp8_forward)(x, w, x_s, w_s)


def fp8_mm_backward_cuda(dy: Tensor, x8: Tensor, w8: Tensor, x_s: float, w_s: float,
                         grad_s: float) -> tuple[Tensor, Tensor]:
    return compiled_on_first_call(fp8_backward)(dy, x8, w8, x_s, w_s, grad_s)


def fp8_mm_fake(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16), torch.empty_like(x, dtype=E4M3), \
        torch.empty_like(w, dtype=E4M3)


def fp8_mm_backward_fake(dy: Tensor, x8: Tensor, w8: Tensor, x_s: float, w_s: float,
                         grad_s: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x8, dtype=torch.bfloat16), w8.new_empty(w8.T.shape, dtype=torch.float32).T


def fp8_mm_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    *_, x_s, w_s, grad_s = inputs
    _, x8, w8 = output
    ctx.save_for_backward(x8, w8)
    ctx.scales = x_s, w_s, grad_s
    ctx.set_materialize_grads(False)  # x8 and W8 get no gradient: no zero tensors for them


def fp8_mm_autograd(ctx, dy: Tensor, *_) -> tuple[Tensor, Tensor, None, None, None]:
    dx, dw = fp8_mm_backward(dy, *ctx.saved_tensors, *ctx.scales)
    return dx, dw, None, None, None


fp8_mm.register_kernel("cuda")(fp8_mm_cuda)
fp8_mm_backward.register_kernel("cuda")(fp8_mm_backward_cuda)
fp8_mm.register_fake(fp8_mm_fake)
fp8_mm_backward.register_fake(fp8_mm_backward_fake)
fp8_mm.register_autograd(fp8_mm_autograd, setup_context=fp8_mm_setup_context)


def fp8_head(x: Tensor, w: Tensor, w_s: float = WEIGHT_SCALES["2025-07-12"], summed: bool = False) -> Tensor:
    """x (..., K) RMS-normed, W (N, K) -> x W^T (..., N) bfloat16 through fp8_mm, at head_scales
    (w_s the weights' scale; summed: the loss is a sum over the rows, not their mean)."""
    rows = x.flatten(0, -2)
    y, _, _ = fp8_mm(rows, w, *head_scales(x.size(-1), rows.size(0), w_s, summed))
    return y.view(*x.shape[:-1], w.size(0))


@functools.cache
def cpu_has_scaled_mm() -> bool:
    """Whether this torch runs torch._scaled_mm on CPU (2.13 does), probed once with a 16 x 16 product."""
    a = torch.ones(16, 16).to(E4M3)
    one = torch.tensor(1.0)
    try:
        torch._scaled_mm(a, a.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@torch.compiler.assume_constant_result  # compiled code runs it once, while tracing: no query in the graph
def why_no_fp8(device: torch.device) -> str | None:
    """None if fp8_mm runs on device; else why not, in words. CUDA needs FP8 tensor cores (compute
    capability 8.9+: Ada, Hopper; an H100 is 9.0); CPU needs a torch with a CPU _scaled_mm."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        supported = (major, minor) >= (8, 9)
        return None if supported else f"{device} has compute capability {major}.{minor}, below 8.9"
    if device.type == "cpu":
        return None if cpu_has_scaled_mm() else f"torch {torch.__version__} has no _scaled_mm on CPU"
    return f"{device.type} has no FP8 matmul here"
