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

ROW_CHUNK = 16384  # tokens per chunk of the elementwise diagonal maths (bounds the fp32 temporaries)
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

    def causal_block(self) -> "FlashBlock":
        """The causal flash block of these segments (queries and keys share the borders)."""
        return FlashBlock(self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len, self.bounds, self.bounds,
                          causal=True)


@dataclass(frozen=True)
class FlashBlock:
    """One varlen flash-attention call: query segment j (flat rows bounds_q[j]:bounds_q[j+1]) attends to key
    segment j (bounds_k[j]:bounds_k[j+1]), causally (bottom-right aligned) or fully. cu_q / cu_k: the same borders
    as int32 tensors on the compute device; max_q / max_k the longest segment of each."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    bounds_q: tuple[int, ...]
    bounds_k: tuple[int, ...]
    causal: bool

    @staticmethod
    def cross(bounds_q: tuple[int, ...], bounds_k: tuple[int, ...], device) -> "FlashBlock":
        """A non-causal block between two lists of segment borders (sequence parallelism's prefix block)."""
        span = lambda b: max(e - a for a, e in zip(b, b[1:]))  # noqa: E731
        to = lambda b: torch.tensor(b, dtype=torch.int32, device=device)  # noqa: E731
        return FlashBlock(to(bounds_q), to(bounds_k), span(bounds_q), span(bounds_k), tuple(bounds_q),
                          tuple(bounds_k), causal=False)


def acc_dtype(x: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: fp64 stays fp64 (reference tests), everything else fp32."""
    return x if x.dtype == torch.float64 else x.float()


_acc = acc_dtype


def expand_kv(x_NkD: torch.Tensor, num_heads: int) -> torch.Tensor:
    """GQA keys/values [N, Hkv, D] -> [N, Hq, D] (each kv head repeated for its group of query heads)."""
    N, Hkv, D = x_NkD.shape
    return x_NkD[:, :, None].expand(N, Hkv, num_heads // Hkv, D).reshape(N, num_heads, D)


def group_sum(x_NhD: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The adjoint of expand_kv: [N, Hq, D] gradients summed over each GQA group -> [N, Hkv, D]."""
    N, Hq, D = x_NhD.shape
    return x_NhD.view(N, num_kv_heads, Hq // num_kv_heads, D).sum(2)


# ---------------------------------------------------------------- flash blocks: CUDA varlen kernel, CPU per segment
def _flash_kernels():
    """(forward, backward) varlen flash ops: a seam, so tests can stand in for the CUDA kernel on the CPU."""
    return torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward


def _gqa_unsupported(err: RuntimeError) -> bool:
    """True only for the kernel refusing fewer kv heads than q heads; never for out-of-memory or anything else."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    msg = str(err).lower()
    if "out of memory" in msg:
        return False
    return "head" in msg and any(w in msg for w in ("support", "same", "equal", "match", "must"))


def _varlen_forward(q, k, v, blk: FlashBlock, scale: float):
    expand = k.shape[1] != q.shape[1] and not _FLASH["native_gqa"]
    ke, ve = (expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])) if expand else (k, v)
    try:
        out, lse, rng, unused, _ = _flash_kernels()[0](
            q, ke, ve, blk.cu_q, blk.cu_k, blk.max_q, blk.max_k, 0.0, blk.causal, False, scale=scale)
    except RuntimeError as err:
        if expand or k.shape[1] == q.shape[1] or not _gqa_unsupported(err):
            raise  # out of memory (or any other failure) must not flip the switch: expanded K/V needs MORE memory
        _FLASH["native_gqa"] = False  # this build's kernel wants as many kv heads as q heads
        return _varlen_forward(q, k, v, blk, scale)
    assert lse.shape == (q.shape[1], q.shape[0]), f"unexpected varlen lse layout {tuple(lse.shape)}"
    return out, lse, (rng, unused, expand)


def _segment_pairs(blk: FlashBlock):
    return zip(zip(blk.bounds_q, blk.bounds_q[1:]), zip(blk.bounds_k, blk.bounds_k[1:]))


def _heads_first(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows a:b of [N, H, D] as the [1, H, n, D] layout of the CPU SDPA kernels."""
    return x[a:b].transpose(0, 1)[None].contiguous()


def flash_block_forward(q, k, v, blk: FlashBlock, scale: float):
    """Flash attention of one block: q [nq, Hq, D], k/v [nk, Hkv, D] -> out [nq, Hq, D] (q.dtype), lse [Hq, nq]
    (fp32; fp64 for fp64 inputs), aux for `flash_block_backward`. CUDA: the varlen kernel (native GQA when the
    build has it); CPU: the SDPA flash kernel for CPU per segment pair (tests: correctness, not speed)."""
    if q.is_cuda:
        return _varlen_forward(q, k, v, blk, scale)
    ke, ve = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    outs, lses = [], []
    for (qa, qb), (ka, kb) in _segment_pairs(blk):
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q, qa, qb), _heads_first(ke, ka, kb), _heads_first(ve, ka, kb), 0.0, blk.causal,
            scale=scale)[:2]
        outs.append(o[0].transpose(0, 1))
        lses.append(acc_dtype(l[0]))
    return torch.cat(outs).contiguous(), torch.cat(lses, dim=1).contiguous(), None


def flash_block_backward(dout, q, k, v, out, lse, blk: FlashBlock, scale: float, aux):
    """Flash backward of one block called with the given (merged) out and lse -> dq [nq], dk, dv [nk, Hkv, D]."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if q.is_cuda:
        rng, unused, expand = aux
        ke, ve = (expand_kv(k, Hq), expand_kv(v, Hq)) if expand else (k, v)
        dq, dk, dv = _flash_kernels()[1](dout, q, ke, ve, out, lse, blk.cu_q, blk.cu_k, blk.max_q, blk.max_k, 0.0,
                                         blk.causal, rng, unused, scale=scale)
        return (dq, group_sum(dk, Hkv), group_sum(dv, Hkv)) if expand else (dq, dk, dv)
    ke, ve = expand_kv(k, Hq), expand_kv(v, Hq)
    grads = [[], [], []]
    for (qa, qb), (ka, kb) in _segment_pairs(blk):
        g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(dout, qa, qb), _heads_first(q, qa, qb), _heads_first(ke, ka, kb),
            _heads_first(ve, ka, kb), _heads_first(out, qa, qb), lse[:, qa:qb][None].contiguous(), 0.0,
            blk.causal, scale=scale)
        for acc, gi in zip(grads, g):
            acc.append(gi[0].transpose(0, 1))
    dq, dk, dv = (torch.cat(g) for g in grads)
    return dq, group_sum(dk, Hkv), group_sum(dv, Hkv)


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


def merge_forward(q, out_c, lse_c_hN, keys, values, scale: float):
    """Merge the causal block with the diagonal keys -> out [N, Hq, D] (q.dtype), lse [Hq, N] (fp32)."""
    N, Hq, D = q.shape
    Hkv = keys[0].shape[1]
    G = Hq // Hkv
    out = torch.empty_like(out_c)
    lse = torch.empty_like(lse_c_hN)
    for a in range(0, N, ROW_CHUNK):
        b = min(a + ROW_CHUNK, N)
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


def merge_backward(dout, q, out, lse_hN, keys, values, scale: float):
    """Gradient contributions of the diagonal terms: dq_diag [N, Hq, D] (fp32), dk_j, dv_j [N, Hkv, D]."""
    N, Hq, D = q.shape
    Hkv = keys[0].shape[1]
    G = Hq // Hkv
    dq = torch.zeros(q.shape, dtype=_acc(q[:1]).dtype, device=q.device)
    dks = [torch.empty_like(k) for k in keys]
    dvs = [torch.empty_like(v) for v in values]
    for a in range(0, N, ROW_CHUNK):
        b = min(a + ROW_CHUNK, N)
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
        out_c, lse_c, aux = flash_block_forward(q, keys[0], values[0], seg.causal_block(), scale)
        if num_keys == 1:
            out, lse = out_c, lse_c
        else:
            out, lse = merge_forward(q, out_c, lse_c, keys[1:], values[1:], scale)
        ctx.save_for_backward(q, out, lse, *kv)
        ctx.seg, ctx.scale, ctx.num_keys, ctx.aux = seg, scale, num_keys, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, *kv = ctx.saved_tensors
        keys, values = kv[:ctx.num_keys], kv[ctx.num_keys:]
        dout = dout.contiguous()
        dq, dk0, dv0 = flash_block_backward(dout, q, keys[0], values[0], out, lse, ctx.seg.causal_block(), ctx.scale,
                                            ctx.aux)
        dks, dvs = [dk0], [dv0]
        if ctx.num_keys > 1:
            dq_diag, dk_diag, dv_diag = merge_backward(dout, q, out, lse, keys[1:], values[1:], ctx.scale)
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
    k0, v0 = expand_kv(keys[0], Hq), expand_kv(values[0], Hq)
    s_hNN = torch.einsum("nhd,mhd->hnm", q_NhD, k0) * scale
    idx = torch.arange(N, device=q_NhD.device)
    mask_NN = (idx[None, :] <= idx[:, None]) & (doc_ids_N[None, :] == doc_ids_N[:, None])
    s_hNN = s_hNN.masked_fill(~mask_NN, float("-inf"))
    diag = [(q_NhD * expand_kv(k, Hq)).sum(-1).t()[..., None] * scale for k in keys[1:]]  # [Hq, N, 1]
    p = torch.softmax(torch.cat([s_hNN, *diag], dim=-1), dim=-1)
    out = torch.einsum("hnm,mhd->nhd", p[..., :N], v0)
    for j, v in enumerate(values[1:]):
        out = out + p[..., N + j].t()[..., None] * expand_kv(v, Hq)
    return out
