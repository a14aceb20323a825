"""TTT attention in O(T) memory: a causal flash-attention block merged with i diagonal keys by log-sum-exp.

At TTT step i the query of token t attends to
  * the step-0 keys/values of tokens s <= t of its own conversation (the causal block, K0/V0), and
  * the "diagonal" keys/values k_j[t], v_j[t] of steps j = 1..i at the same token t.
Step 0 is the causal block alone. Writing o_c, lse_c for the causal block's output and log-sum-exp and
s_j = scale * q . k_j for the diagonal scores, the exact softmax over all keys is

    lse = log(e^{lse_c} + sum_j e^{s_j})
    out = e^{lse_c - lse} o_c + sum_j e^{s_j - lse} v_j

Backward (same trick as ring attention): the flash backward of the causal block called with the MERGED out and
MERGED lse computes P = exp(S - lse) and D = rowsum(dO * out), hence the exact dQ/dK0/dV0 of the causal keys under
the merged softmax. The diagonal terms are elementwise: p_j = e^{s_j - lse}, ds_j = p_j (dO . v_j - D),
dq += scale ds_j k_j, dk_j = scale ds_j q, dv_j = p_j dO (summed over the query heads of a GQA group).
No T x T tensor exists anywhere: memory is O(N * heads * head_dim).

Causal block: on CUDA the varlen flash kernel (`aten._flash_attention_forward/_backward`, cu_seqlens over the packed
conversations); on CPU the SDPA flash kernel for CPU per conversation (tests: correctness, not speed).
Layout: flat tokens, q [N, Hq, D], k/v [N, Hkv, D], Hq a multiple of Hkv (GQA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_ROW_CHUNK = 16384  # tokens per chunk of the elementwise diagonal maths (bounds the fp32 temporaries)
_FLASH = {"native_gqa": True}  # CUDA flash kernel takes fewer kv heads than q heads (checked on first use)


@dataclass(frozen=True)
class Segments:
    """Borders of the packed conversations in the flat token axis (each a causal attention island).

    cu_seqlens int32 [S+1] (on the compute device), bounds the same as a Python tuple, max_len the longest one.
    """
    cu_seqlens: torch.Tensor
    bounds: tuple[int, ...]
    max_len: int

    @staticmethod
    def from_doc_ids(doc_ids_BT: torch.Tensor) -> "Segments":
        """A new segment starts at every row start and wherever doc_ids changes (a padding run is one segment)."""
        if doc_ids_BT.dim() != 2 or doc_ids_BT.numel() == 0:
            raise ValueError(f"doc_ids must be a non-empty [B, T] tensor, got shape {tuple(doc_ids_BT.shape)}")
        B, T = doc_ids_BT.shape
        change_BT = torch.ones_like(doc_ids_BT, dtype=torch.bool)
        change_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
        starts = torch.nonzero(change_BT.reshape(-1)).flatten().cpu().tolist()
        return Segments.from_bounds((*starts, B * T), device=doc_ids_BT.device)

    @staticmethod
    def from_bounds(bounds: tuple[int, ...] | list[int], device: torch.device | str = "cpu") -> "Segments":
        bounds = tuple(int(b) for b in bounds)
        if len(bounds) < 2 or bounds[0] != 0 or any(b >= e for b, e in zip(bounds, bounds[1:])):
            raise ValueError(f"segment bounds must start at 0 and increase strictly, got {bounds[:8]}...")
        lengths = [e - b for b, e in zip(bounds, bounds[1:])]
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        return Segments(cu, bounds, max(lengths))


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: fp64 stays fp64 (reference tests), everything else fp32."""
    return x if x.dtype == torch.float64 else x.float()


def _expand_kv(x_NkD: torch.Tensor, num_heads: int) -> torch.Tensor:
    N, Hkv, D = x_NkD.shape
    return x_NkD[:, :, None].expand(N, Hkv, num_heads // Hkv, D).reshape(N, num_heads, D)


def _group_sum(x_NhD: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    N, Hq, D = x_NhD.shape
    return x_NhD.view(N, num_kv_heads, Hq // num_kv_heads, D).sum(2)


# ---------------------------------------------------------------- causal block: CUDA varlen flash, CPU per segment
def _causal_forward(q, k, v, seg: Segments, scale: float):
    """-> out [N, Hq, D] (q.dtype), lse [Hq, N] (fp32; fp64 for fp64 inputs), aux for the backward."""
    if q.is_cuda:
        expand = k.shape[1] != q.shape[1] and not _FLASH["native_gqa"]
        if expand:
            k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        try:
            out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, 0.0, True, False, scale=scale)
        except RuntimeError:
            if expand or k.shape[1] == q.shape[1]:
                raise
            _FLASH["native_gqa"] = False  # this build's kernel wants as many kv heads as q heads
            return _causal_forward(q, k, v, seg, scale)
        assert lse.shape == (q.shape[1], q.shape[0]), f"unexpected varlen lse layout {tuple(lse.shape)}"
        return out, lse, (rng, unused, expand)
    Hq = q.shape[1]
    k, v = _expand_kv(k, Hq), _expand_kv(v, Hq)
    outs, lses = [], []
    for b, e in zip(seg.bounds, seg.bounds[1:]):
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(x[b:e].transpose(0, 1)[None].contiguous() for x in (q, k, v)), 0.0, True, scale=scale)[:2]
        outs.append(o[0].transpose(0, 1))
        lses.append(_acc(l[0]))
    return torch.cat(outs).contiguous(), torch.cat(lses, dim=1).contiguous(), None


def _causal_backward(dout, q, k, v, out, lse, seg: Segments, scale: float, aux):
    """Flash backward with the given (merged) out and lse -> dq, dk, dv of the causal block."""
    if q.is_cuda:
        rng, unused, expand = aux
        Hkv = k.shape[1]
        if expand:
            k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, 0.0,
            True, rng, unused, scale=scale)
        return (dq, _group_sum(dk, Hkv), _group_sum(dv, Hkv)) if expand else (dq, dk, dv)
    Hq, Hkv = q.shape[1], k.shape[1]
    ke, ve = _expand_kv(k, Hq), _expand_kv(v, Hq)
    grads = [[], [], []]
    for b, e in zip(seg.bounds, seg.bounds[1:]):
        args = [x[b:e].transpose(0, 1)[None].contiguous() for x in (dout, q, ke, ve, out)]
        l = lse[:, b:e][None].contiguous()
        g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args, l, 0.0, True, scale=scale)
        for acc, gi in zip(grads, g):
            acc.append(gi[0].transpose(0, 1))
    dq, dk, dv = (torch.cat(g) for g in grads)
    return dq, _group_sum(dk, Hkv), _group_sum(dv, Hkv)


# ---------------------------------------------------------------- diagonal terms (elementwise, chunked over tokens)
# Per-key kernels with fixed signatures, so one torch.compile graph serves every TTT depth (see compile_kernels).
def _diag_add(q_nkgD, k_nkD, v_nkD, m_nkg, z_nkg, acc_nkgD, scale: float):
    """Online-softmax update with one diagonal key: s = scale q.k; rescale the running (max m, sum z, acc)."""
    s = (_acc(q_nkgD) * _acc(k_nkD[:, :, None])).sum(-1) * scale
    m_new = torch.maximum(m_nkg, s)
    alpha, beta = torch.exp(m_nkg - m_new), torch.exp(s - m_new)
    return m_new, z_nkg * alpha + beta, acc_nkgD * alpha[..., None] + beta[..., None] * _acc(v_nkD[:, :, None])


def _diag_finish(m_nkg, z_nkg, acc_nkgD, dtype: torch.dtype):
    return (acc_nkgD / z_nkg[..., None]).to(dtype), m_nkg + torch.log(z_nkg)


def _diag_grad(q_nkgD, k_nkD, v_nkD, do_nkgD, delta_nkg, lse_nkg, scale: float):
    """p = e^{s - lse}; ds = p (dO.v - delta) -> (dq contribution fp32, dk, dv) of one diagonal key."""
    s = (_acc(q_nkgD) * _acc(k_nkD[:, :, None])).sum(-1) * scale
    p = torch.exp(s - lse_nkg)
    ds = p * ((_acc(do_nkgD) * _acc(v_nkD[:, :, None])).sum(-1) - delta_nkg) * scale
    dq = ds[..., None] * _acc(k_nkD[:, :, None])
    dk = (ds[..., None] * _acc(q_nkgD)).sum(2).to(k_nkD.dtype)
    dv = (p[..., None] * _acc(do_nkgD)).sum(2).to(v_nkD.dtype)
    return dq, dk, dv


def _delta(do_nkgD, out_nkgD):
    return (_acc(do_nkgD) * _acc(out_nkgD)).sum(-1)


_K = {"add": _diag_add, "finish": _diag_finish, "grad": _diag_grad, "delta": _delta}


def compile_kernels() -> None:
    """torch.compile the elementwise diagonal kernels (GPU speed; dynamic shapes, one graph each)."""
    for name, fn in list(_K.items()):
        _K[name] = torch.compile(fn, dynamic=True)


def _merge_forward(q, out_c, lse_c_hN, keys, values, scale: float):
    """Merge the causal block with the diagonal keys -> out [N, Hq, D] (q.dtype), lse [Hq, N] (fp32)."""
    N, Hq, D = q.shape
    Hkv = keys[0].shape[1]
    G = Hq // Hkv
    out = torch.empty_like(out_c)
    lse = torch.empty_like(lse_c_hN)
    for a in range(0, N, _ROW_CHUNK):
        b = min(a + _ROW_CHUNK, N)
        n = b - a
        q_g = q[a:b].view(n, Hkv, G, D)
        m = lse_c_hN[:, a:b].t().reshape(n, Hkv, G)          # the causal block enters with weight e^{lse_c}
        z = torch.ones_like(m)
        acc = _acc(out_c[a:b]).view(n, Hkv, G, D)
        for k, v in zip(keys, values):
            m, z, acc = _K["add"](q_g, k[a:b], v[a:b], m, z, acc, scale)
        o, l = _K["finish"](m, z, acc, out.dtype)
        out[a:b] = o.view(n, Hq, D)
        lse[:, a:b] = l.view(n, Hq).t()
    return out, lse


def _merge_backward(dout, q, out, lse_hN, keys, values, scale: float):
    """Gradient contributions of the diagonal terms: dq_diag [N, Hq, D] (fp32), dk_j, dv_j [N, Hkv, D]."""
    N, Hq, D = q.shape
    Hkv = keys[0].shape[1]
    G = Hq // Hkv
    dq = torch.zeros(q.shape, dtype=_acc(q[:1]).dtype, device=q.device)
    dks = [torch.empty_like(k) for k in keys]
    dvs = [torch.empty_like(v) for v in values]
    for a in range(0, N, _ROW_CHUNK):
        b = min(a + _ROW_CHUNK, N)
        n = b - a
        q_g, do_g = q[a:b].view(n, Hkv, G, D), dout[a:b].view(n, Hkv, G, D)
        delta = _K["delta"](do_g, out[a:b].view(n, Hkv, G, D))  # D = rowsum(dO * out)
        lse = lse_hN[:, a:b].t().reshape(n, Hkv, G)
        dq_g = dq[a:b].view(n, Hkv, G, D)
        for j, (k, v) in enumerate(zip(keys, values)):
            dq_j, dks[j][a:b], dvs[j][a:b] = _K["grad"](q_g, k[a:b], v[a:b], do_g, delta, lse, scale)
            dq_g += dq_j
    return dq, dks, dvs


class _TTTAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, seg: Segments, scale: float, num_keys: int, *kv):
        keys, values = kv[:num_keys], kv[num_keys:]
        out_c, lse_c, aux = _causal_forward(q, keys[0], values[0], seg, scale)
        if num_keys == 1:
            out, lse = out_c, lse_c
        else:
            out, lse = _merge_forward(q, out_c, lse_c, keys[1:], values[1:], scale)
        ctx.save_for_backward(q, out, lse, *kv)
        ctx.seg, ctx.scale, ctx.num_keys, ctx.aux = seg, scale, num_keys, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, *kv = ctx.saved_tensors
        keys, values = kv[:ctx.num_keys], kv[ctx.num_keys:]
        dout = dout.contiguous()
        dq, dk0, dv0 = _causal_backward(dout, q, keys[0], values[0], out, lse, ctx.seg, ctx.scale, ctx.aux)
        dks, dvs = [dk0], [dv0]
        if ctx.num_keys > 1:
            dq_diag, dk_diag, dv_diag = _merge_backward(dout, q, out, lse, keys[1:], values[1:], ctx.scale)
            dq = (_acc(dq) + dq_diag).to(q.dtype)
            dks += dk_diag
            dvs += dv_diag
        return (dq, None, None, None, *dks, *dvs)


def ttt_attention(q_NhD: torch.Tensor, keys: tuple[torch.Tensor, ...] | list[torch.Tensor],
                  values: tuple[torch.Tensor, ...] | list[torch.Tensor], segments: Segments,
                  scale: float | None = None) -> torch.Tensor:
    """TTT attention: q [N, Hq, D]; keys/values: entry 0 = step-0 keys (causal block), entries 1..i = the diagonal
    keys of steps 1..i (the current step's own keys last). Returns [N, Hq, D] in q's dtype."""
    if len(keys) != len(values) or not keys:
        raise ValueError(f"need as many values as keys (>= 1), got {len(keys)} and {len(values)}")
    N, Hq, D = q_NhD.shape
    for t in (*keys, *values):
        if t.shape[0] != N or t.shape[2] != D or Hq % t.shape[1]:
            raise ValueError(f"key/value shape {tuple(t.shape)} does not fit queries {tuple(q_NhD.shape)}")
    if segments.bounds[-1] != N:
        raise ValueError(f"segments cover {segments.bounds[-1]} tokens, queries have {N}")
    scale = D ** -0.5 if scale is None else scale
    attend = getattr(segments, "attend", None)  # sequence_parallel.SPSegments: a slice of rows split over ranks
    if attend is not None:
        return attend(q_NhD, keys, values, scale)
    kv = [t.contiguous() for t in (*keys, *values)]
    return _TTTAttention.apply(q_NhD.contiguous(), segments, scale, len(keys), *kv)


def reference_ttt_attention(q_NhD, keys, values, doc_ids_N: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Naive masked softmax over [causal step-0 keys of the same doc | diagonal keys] (tests; O(N^2) memory)."""
    N, Hq, D = q_NhD.shape
    scale = D ** -0.5 if scale is None else scale
    k0, v0 = _expand_kv(keys[0], Hq), _expand_kv(values[0], Hq)
    s_hNN = torch.einsum("nhd,mhd->hnm", q_NhD, k0) * scale
    idx = torch.arange(N, device=q_NhD.device)
    mask_NN = (idx[None, :] <= idx[:, None]) & (doc_ids_N[None, :] == doc_ids_N[:, None])
    s_hNN = s_hNN.masked_fill(~mask_NN, float("-inf"))
    diag = [(q_NhD * _expand_kv(k, Hq)).sum(-1).t()[..., None] * scale for k in keys[1:]]  # [Hq, N, 1]
    p = torch.softmax(torch.cat([s_hNN, *diag], dim=-1), dim=-1)
    out = torch.einsum("hnm,mhd->nhd", p[..., :N], v0)
    for j, v in enumerate(values[1:]):
        out = out + p[..., N + j].t()[..., None] * _expand_kv(v, Hq)
    return out
