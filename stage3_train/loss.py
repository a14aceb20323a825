"""Fused lm_head + cross-entropy that never keeps [N, Vd] logits (Liger-style: gradients in the forward pass).

For a chunk of C tokens with hidden h [C, H], head W [Vd, H] and labels y (-100 = ignored):

    z = h W^T (matmul in the input dtype, fp32 accumulation),  lse = logsumexp(z) in fp32,
    CE = sum_valid (lse - z_y),   dCE/dz = softmax(z) - onehot(y) (0 on ignored rows),
    dCE/dh = (dCE/dz) W,          dCE/dW = (dCE/dz)^T h  (accumulated over chunks in fp32).

Both gradients are computed inside the forward chunk loop, so only one chunk's logits exist at a time and the
backward is a scale by the incoming grad (the loss is linear in CE). Kept for backward: grad_h [N, H] and
grad_W [Vd, H] in the parameters' dtype — not h, not the logits. When no input needs a gradient (evaluation,
`torch.no_grad`) only the CE and the argmax are computed.
"""
from __future__ import annotations

import torch

IGNORE = -100
_LOGITS_BUDGET = 1 << 26  # elements of one chunk's fp32 logits (256 MiB): chunk = budget // Vd tokens


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = h_NH.shape[0]
        acc_dtype = torch.float64 if h_NH.dtype == torch.float64 else torch.float32
        ce_sum = torch.zeros((), dtype=acc_dtype, device=h_NH.device)
        correct = torch.zeros((), dtype=torch.long, device=h_NH.device)
        grad_h = torch.empty_like(h_NH) if need_h else None
        grad_w = torch.zeros(w_VH.shape, dtype=acc_dtype, device=w_VH.device) if need_w else None
        for a in range(0, N, chunk):
            h_CH, y_C = h_NH[a:a + chunk], labels_N[a:a + chunk]
            z_CV = (h_CH @ w_VH.t()).to(acc_dtype)                 # one chunk of logits
            valid_C = y_C != IGNORE
            y_safe = torch.where(valid_C, y_C, 0)
            lse_C = torch.logsumexp(z_CV, dim=-1)
            z_y = z_CV.gather(1, y_safe[:, None])[:, 0]
            ce_sum += torch.where(valid_C, lse_C - z_y, 0).sum()
            correct += ((z_CV.argmax(-1) == y_C) & valid_C).sum()
            if not (need_h or need_w):
                continue
            g_CV = torch.exp_(z_CV.sub_(lse_C[:, None]))           # softmax, in place of the logits
            g_CV.scatter_add_(1, y_safe[:, None], -valid_C[:, None].to(acc_dtype))
            g_CV.mul_(valid_C[:, None])
            g_CV = g_CV.to(h_NH.dtype)
            if need_h:
                grad_h[a:a + chunk] = g_CV @ w_VH
            if need_w:
                grad_w += (g_CV.t() @ h_CH).to(acc_dtype)
        ctx.save_for_backward(grad_h if need_h else None, grad_w.to(w_VH.dtype) if need_w else None)
        ctx.mark_non_differentiable(correct)
        return ce_sum, correct

    @staticmethod
    def backward(ctx, grad_ce, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        scale_h = None if grad_h is None else grad_h * grad_ce.to(grad_h.dtype)
        scale_w = None if grad_w is None else grad_w * grad_ce.to(grad_w.dtype)
        return scale_h, scale_w, None, None


def linear_cross_entropy(h_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor,
                         chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over labels != -100 [differentiable scalar, fp32], count of argmax == label [int64 scalar]).

    h [N, H], weight [Vd, H] (the lm_head), labels [N] int64 draft ids or -100. chunk_size None = 2^26 / Vd tokens.
    """
    if h_NH.dim() != 2 or weight_VH.dim() != 2 or h_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"need h [N, H] and weight [V, H], got {tuple(h_NH.shape)} and {tuple(weight_VH.shape)}")
    if labels_N.shape != (h_NH.shape[0],):
        raise ValueError(f"labels must be [N={h_NH.shape[0]}], got {tuple(labels_N.shape)}")
    chunk = chunk_size or max(1, _LOGITS_BUDGET // weight_VH.shape[0])
    weight = weight_VH if weight_VH.dtype == h_NH.dtype else weight_VH.to(h_NH.dtype)
    return _LinearCrossEntropy.apply(h_NH, weight, labels_N.long(), int(chunk))
