"""Fused lm_head + cross-entropy that never keeps [N, Vd] logits (Liger-style: gradients in the forward pass).

For a chunk of C tokens with hidden h [C, H], head W [Vd, H] and labels y (-100 = ignored):

    z = h W^T (matmul in the input dtype, fp32 accumulation),  lse = logsumexp(z) in fp32,
    CE = sum_valid (lse - z_y),   dCE/dz = softmax(z) - onehot(y) (0 on ignored rows),
    dCE/dh = (dCE/dz) W,          dCE/dW = (dCE/dz)^T h  (accumulated over chunks in fp32).

Both gradients are computed inside the forward chunk loop, so only one chunk's logits exist at a time and the
backward is a scale by the incoming grad (the output is linear in CE). Kept for backward: grad_h [N, H] and grad_W
— not h, not the logits. When no input needs a gradient (evaluation, `torch.no_grad`) only CE and argmax run.

Several calls that share one head (the k TTT steps) can share one fp32 grad_W accumulator (`HeadGrad`): each call
returns `weight * CE` and adds `weight * dCE/dW` into the accumulator; the first backward to run returns the whole
accumulated grad_W (scaled by its incoming grad) and the others none. This is exact when the outputs enter the final
loss as a plain sum (the incoming grads are all equal), which is how `ttt_forward` uses it; it keeps one
[Vd, H] buffer instead of k.
"""
from __future__ import annotations

import torch

IGNORE = -100
_LOGITS_BUDGET = 1 << 26  # elements of one chunk's fp32 logits (256 MiB): chunk = budget // Vd tokens


class HeadGrad:
    """A shared fp32 grad_W accumulator for the calls of one forward pass (see the module docstring)."""

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None
        self.taken = False


def _ce_chunk(z_CV: torch.Tensor, y_C: torch.Tensor, weight: torch.Tensor, need_grad: bool,
              grad_dtype: torch.dtype):
    """-> (CE sum, argmax == y count, weight * dCE/dz in grad_dtype or None) of one logits chunk; fp32 maths."""
    z = z_CV.float() if z_CV.dtype != torch.float64 else z_CV
    valid = y_C != IGNORE
    y_safe = torch.where(valid, y_C, 0)
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, y_safe[:, None])[:, 0]
    ce = torch.where(valid, lse - z_y, 0).sum()
    correct = ((z.argmax(-1) == y_C) & valid).sum()
    if not need_grad:
        return ce, correct, None
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == y_safe[:, None]
    g = (torch.exp(z - lse[:, None]) - onehot.to(z.dtype)) * (valid[:, None] * weight)
    return ce, correct, g.to(grad_dtype)


_K = {"ce": _ce_chunk}


def compile_kernels() -> None:
    """torch.compile the per-chunk softmax/CE/gradient maths (one fused pass over the logits on GPU)."""
    _K["ce"] = torch.compile(_ce_chunk, dynamic=True)


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b. CUDA, bf16/fp16 operands into an fp32 acc: one GEMM with the fp32 accumulator as its C
    (beta = 1, `addmm(out_dtype=fp32)`), no [Vd, H] half-precision product and no separate fp32 add over it
    (at 8K tokens, Llama-8B draft: 28 adds of a 32000 x 4096 fp32 tensor, ~14 ms of a 320 ms step). Elsewhere
    (CPU, fp32/fp64): the product, then the add."""
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH, w_VH, labels_N, chunk: int, weight, head_grad: HeadGrad | None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = h_NH.shape[0]
        acc_dtype = torch.float64 if h_NH.dtype == torch.float64 else torch.float32
        ce_sum = torch.zeros((), dtype=acc_dtype, device=h_NH.device)
        correct = torch.zeros((), dtype=torch.long, device=h_NH.device)
        grad_h = torch.empty_like(h_NH) if need_h else None
        grad_w = None
        if need_w:
            if head_grad is None:
                head_grad = HeadGrad()
            if head_grad.grad is None:
                head_grad.grad = torch.zeros(w_VH.shape, dtype=acc_dtype, device=w_VH.device)
            grad_w = head_grad.grad
        weight_t = torch.tensor(weight, dtype=acc_dtype, device=h_NH.device)  # a tensor: no recompile per value
        for a in range(0, N, chunk):
            h_CH = h_NH[a:a + chunk]
            ce, ok, g_CV = _K["ce"](h_CH @ w_VH.t(), labels_N[a:a + chunk], weight_t, need_h or need_w, h_NH.dtype)
            ce_sum += ce
            correct += ok
            if g_CV is None:
                continue
            if need_h:
                grad_h[a:a + chunk] = g_CV @ w_VH
            if need_w:
                accumulate_mm(grad_w, g_CV.t(), h_CH)
        ctx.head_grad, ctx.w_dtype = head_grad, w_VH.dtype
        ctx.save_for_backward(grad_h)
        raw = ce_sum.clone()
        ctx.mark_non_differentiable(raw, correct)
        return ce_sum * weight, raw, correct

    @staticmethod
    def backward(ctx, grad_out, _grad_raw, _grad_correct):
        (grad_h,) = ctx.saved_tensors
        scaled_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        scaled_w = None
        head_grad = ctx.head_grad
        if head_grad is not None and not head_grad.taken:
            head_grad.taken = True
            scaled_w = (head_grad.grad * grad_out).to(ctx.w_dtype)
            head_grad.grad = None
        return scaled_h, scaled_w, None, None, None, None


def linear_cross_entropy(h_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor,
                         chunk_size: int | None = None, *, loss_weight: float = 1.0,
                         head_grad: HeadGrad | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_weight * CE sum [differentiable fp32 scalar], CE sum [detached], argmax == label count [int64]).

    CE sum = sum of cross-entropy over the positions whose label is not -100.

    h [N, H], weight [Vd, H] (the lm_head), labels [N] int64 draft ids or -100. chunk_size None = 2^26 / Vd tokens.
    head_grad: share one grad_W accumulator between calls whose outputs are summed (see the module docstring).
    """
    if h_NH.dim() != 2 or weight_VH.dim() != 2 or h_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"need h [N, H] and weight [V, H], got {tuple(h_NH.shape)} and {tuple(weight_VH.shape)}")
    if labels_N.shape != (h_NH.shape[0],):
        raise ValueError(f"labels must be [N={h_NH.shape[0]}], got {tuple(labels_N.shape)}")
    chunk = chunk_size or max(1, _LOGITS_BUDGET // weight_VH.shape[0])
    weight = weight_VH if weight_VH.dtype == h_NH.dtype else weight_VH.to(h_NH.dtype)
    return _LinearCrossEntropy.apply(h_NH, weight, labels_N.long(), int(chunk), float(loss_weight), head_grad)
