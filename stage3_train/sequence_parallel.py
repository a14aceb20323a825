"""Sequence (context) parallelism: one packed row split over the N ranks of a sequence-parallel (SP) group.

Layout. The world is a 2-D mesh ("dp", "sp"), sp innermost (an SP group = N consecutive ranks, one node). The
ranks of an SP group load the same packed rows (the loader runs with rank = dp_rank, world = dp_size) and each keeps
a contiguous slice of every row: with T padded up to N*L, SP rank r owns tokens [rL, rL+L) — their hidden features,
position ids and everything computed from them (q, k, v, MLP activations, CE). Memory per rank is O(T/N) except the
step-0 keys/values, which are all-gathered (O(T * Hkv * D), small: Llama-3-style context parallelism).

TTT halo. Step i at token t reads input_ids[t+1+i], target_ids[t+1+i], loss_mask[t+2+i], doc_ids[t+2+i]
(ttt.py), so a rank also needs the first H = k+1 of those four (cheap, integer) arrays past its slice: `shard_batch`
cuts them from the full row (filled with 0 / False / -1 past T, which is exactly `ttt._shift_left`'s fill), and
`ttt_forward(..., sp=shard)` runs on [slice | halo]. Hence labels, valid_mask and the shifted tokens of every
local position equal the single-process ones, also for a conversation crossing the rank border.

Attention. Query t (global, on rank r) attends to the step-0 keys s <= t of its conversation plus its own diagonal
keys (attention.py). Split the causal keys at the slice start a = rL:
  * local block: keys s in [a, t]: the existing causal flash block over the local segments;
  * prefix block: keys s in [p0, a) where p0 = start of the conversation holding token a. Only the FIRST local
    segment of a row can reach back before a, and all its keys precede all its queries, so this block is plain
    (non-causal) attention of the queries [a, a+e) against the all-gathered keys [p0, a) (varlen flash on CUDA).
The blocks and the diagonal keys merge by log-sum-exp, as in attention.py:
    lse = log(e^{lse_local} + e^{lse_prefix} + sum_j e^{s_j}),  out = sum_blocks e^{lse_block - lse} out_block.
Backward: each flash block's backward called with the MERGED out and lse yields its exact dq, dk, dv under the
merged softmax (P = exp(S - lse), D = rowsum(dO * out)). The prefix block's dK/dV live in the gathered layout; they
are summed onto their owners with one reduce-scatter (fp32), and added to the local block's dK/dV. Rank 0 and rows
without a crossing conversation still take part in the collectives (every SP rank calls them in the same order).

Loss and gradients. CE sums and valid counts are local; the trainer all-reduces valid counts over the whole world
(dp x sp) and FSDP2 over the flattened world SUMS the parameter gradients (parallelize.py), so SP ranks' partial
gradients of the same parameters add up to the single-process gradient.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from stage3_train.attention import (ROW_CHUNK, FlashBlock, Segments, acc_dtype, flash_block_backward,
                                    flash_block_forward, merge_backward, merge_forward)
from stage3_train.ttt import PackedBatch

if TYPE_CHECKING:
    from stage3_train.data import MicroBatch

# torch >= 2.12 renames these collectives (the GPU stack, 2.11, has only the old names): same semantics.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* deprecated")

_FILL = {"input_ids": 0, "target_ids": 0, "loss_mask": False, "doc_ids": -1}  # ttt._shift_left's fill past T


@dataclass(frozen=True)
class SPGroup:
    """This rank's place in the ("dp", "sp") mesh."""
    group: object  # the SP process group
    rank: int      # rank inside the SP group
    size: int      # N
    dp_rank: int
    dp_size: int

    @staticmethod
    def from_mesh(mesh) -> "SPGroup":
        """This rank's place in the ("dp", "sp") mesh of `common.distributed`."""
        sp, dp = mesh["sp"], mesh["dp"]
        return SPGroup(sp.get_group(), sp.get_local_rank(), sp.size(), dp.get_local_rank(), dp.size())

    @staticmethod
    def create(sp_size: int, device_type: str) -> "SPGroup":
        """From the one mesh builder, over the initialised process group."""
        from common.distributed import build_mesh

        return SPGroup.from_mesh(build_mesh(sp_size, device_type))


@dataclass(frozen=True)
class SPSegments(Segments):
    """Local segments (a Segments for the local slice) plus the prefix block's index maps.

    q_index [nx]: flat local queries of the first segment of each crossing row; k_index [nk]: their keys in the
    gathered layout (rank-major [N, B, L]); prefix: the non-causal FlashBlock between them (per-row borders
    bounds_q / bounds_k), None when no conversation crosses into this rank's slice.
    """
    sp: SPGroup
    q_index: torch.Tensor
    k_index: torch.Tensor
    prefix: FlashBlock | None

    @property
    def has_prefix(self) -> bool:
        return self.prefix is not None

    @property
    def bounds_q(self) -> tuple[int, ...]:
        return self.prefix.bounds_q if self.prefix else (0,)

    @property
    def bounds_k(self) -> tuple[int, ...]:
        return self.prefix.bounds_k if self.prefix else (0,)

    def attend(self, q, keys, values, scale: float) -> torch.Tensor:
        kv = [t.contiguous() for t in (*keys, *values)]
        return _SPAttention.apply(q.contiguous(), self, scale, len(keys), *kv)


@dataclass
class SequenceShard:
    """What `ttt_forward(..., sp=...)` needs beside the local batch: the halo and the SP segments."""
    halo: dict[str, torch.Tensor]  # input_ids, target_ids, loss_mask, doc_ids [B, H]: the tokens after the slice
    segments: SPSegments


def _pad_to(x_BT: torch.Tensor, length: int, fill) -> torch.Tensor:
    extra = length - x_BT.shape[1]
    if extra <= 0:
        return x_BT
    pad = torch.full((x_BT.shape[0], extra, *x_BT.shape[2:]), fill, dtype=x_BT.dtype, device=x_BT.device)
    return torch.cat([x_BT, pad], dim=1)


def _prefix_maps(doc_BT: torch.Tensor, r: int, L: int):
    """Per row: p0 = start of the conversation holding token a = rL, e = length of the first local segment.
    -> (q index list, k index list, bounds_q, bounds_k) for the rows with p0 < a."""
    B, _ = doc_BT.shape
    a = r * L
    change_BT = torch.ones_like(doc_BT, dtype=torch.bool)
    change_BT[:, 1:] = doc_BT[:, 1:] != doc_BT[:, :-1]
    q_idx, k_idx, bq, bk = [], [], [0], [0]
    for b in range(B):
        if r == 0 or change_BT[b, a]:
            continue
        p0 = int(torch.nonzero(change_BT[b, :a]).max())
        later = torch.nonzero(change_BT[b, a + 1:a + L]).flatten()
        e = int(later[0]) + 1 if later.numel() else L
        g = torch.arange(p0, a)
        q_idx.append(torch.arange(b * L, b * L + e))
        k_idx.append(torch.div(g, L, rounding_mode="floor") * (B * L) + b * L + g % L)  # gathered [N, B, L] layout
        bq.append(bq[-1] + e)
        bk.append(bk[-1] + a - p0)
    return q_idx, k_idx, tuple(bq), tuple(bk)


def shard_batch(batch: PackedBatch, sp: SPGroup, ttt_steps: int, device: torch.device | str | None = None, *,
                local_hidden: torch.Tensor | None = None) -> tuple[PackedBatch, SequenceShard]:
    """This SP rank's slice of the full rows `batch` [B, T] (any device; slice first, then move to `device`).

    T is padded to a multiple of N with padding tokens (doc -1; they never carry a label). Returns the local
    PackedBatch [B, L] and the SequenceShard (halo of H = ttt_steps + 1 tokens, SP segments).
    local_hidden [B, L, W]: this rank's hidden slice, already cut (data.collate(hidden_part=...)); batch.hidden is
    then ignored (any [B, T, W] placeholder, e.g. an expanded zero)."""
    if ttt_steps < 1:
        raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
    device = torch.device(device) if device is not None else batch.input_ids.device
    B, T = batch.input_ids.shape
    N, r, H = sp.size, sp.rank, ttt_steps + 1
    L = -(-T // N)
    a, e = r * L, (r + 1) * L
    full = {"input_ids": batch.input_ids, "target_ids": batch.target_ids, "loss_mask": batch.loss_mask.bool(),
            "doc_ids": batch.doc_ids}
    ext = {k: _pad_to(v, N * L + H, _FILL[k]) for k, v in full.items()}
    if local_hidden is None:
        local_hidden = _pad_to(batch.hidden, N * L, 0)[:, a:e]
    elif tuple(local_hidden.shape[:2]) != (B, L):
        raise ValueError(f"local_hidden has shape {tuple(local_hidden.shape)}, rank {r} of {N} needs [{B}, {L}, W]")
    local = PackedBatch(input_ids=ext["input_ids"][:, a:e], hidden=local_hidden,
                        target_ids=ext["target_ids"][:, a:e], loss_mask=ext["loss_mask"][:, a:e],
                        position_ids=_pad_to(batch.position_ids, N * L, 0)[:, a:e], doc_ids=ext["doc_ids"][:, a:e])
    local = local.to(device)
    halo = {k: v[:, e:e + H].to(device) for k, v in ext.items()}
    q_idx, k_idx, bq, bk = _prefix_maps(ext["doc_ids"][:, :N * L].cpu(), r, L)
    base = Segments.from_doc_ids(local.doc_ids)
    cat = (lambda xs: torch.cat(xs).to(device)) if q_idx else (lambda xs: torch.zeros(0, dtype=torch.long,
                                                                                      device=device))
    prefix = FlashBlock.cross(bq, bk, device) if q_idx else None
    seg = SPSegments(base.cu_seqlens, base.bounds, base.max_len, sp, cat(q_idx), cat(k_idx), prefix)
    return local, SequenceShard(halo, seg)


def shard_collated(mb: "MicroBatch", sp: SPGroup, ttt_steps: int,
                   device: torch.device | str) -> tuple[PackedBatch, SequenceShard]:
    """`shard_batch` of a data.MicroBatch whose `hidden` is either the whole rows [B, T, W] or already this rank's
    slice [B, ceil(T/N), W] (the loader's hidden_part): the trainer's path, host memory O(T/N) per rank."""
    B, T = mb.input_ids.shape
    hidden = mb.device_hidden(device)  # bf16 (fp8 shards dequantised on the device)
    ints = dict(input_ids=mb.input_ids, target_ids=mb.target_ids, loss_mask=mb.loss_mask,
                position_ids=mb.position_ids, doc_ids=mb.doc_ids)
    if hidden.shape[1] == T and -(-T // sp.size) != T:  # whole rows
        return shard_batch(PackedBatch(**ints, hidden=hidden), sp, ttt_steps, device)
    placeholder = hidden[:, :1].expand(B, T, hidden.shape[-1])
    return shard_batch(PackedBatch(**ints, hidden=placeholder), sp, ttt_steps, device, local_hidden=hidden)


# ---------------------------------------------------------------- collectives over the SP group
def _gather(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """[n, ...] local -> [N*n, ...] rank-major."""
    out = x.new_empty((sp.size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=sp.group)
    return out


def _reduce_scatter(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """[N*n, ...] rank-major -> this rank's [n, ...] summed over the group."""
    out = x.new_empty((x.shape[0] // sp.size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=sp.group)
    return out


# ---------------------------------------------------------------- prefix block merge
def _merge_blocks(out, lse_hN, idx, out_x, lse_x_hN):
    """Merge the prefix block into rows `idx` of the local block by log-sum-exp (in place, chunked)."""
    for a in range(0, idx.numel(), ROW_CHUNK):
        i = idx[a:a + ROW_CHUNK]
        l_c, l_x = lse_hN[:, i], lse_x_hN[:, a:a + i.numel()]
        l = torch.logaddexp(l_c, l_x)
        w_c, w_x = torch.exp(l_c - l).t()[..., None], torch.exp(l_x - l).t()[..., None]   # [n, Hq, 1]
        out[i] = (w_c * acc_dtype(out[i]) + w_x * acc_dtype(out_x[a:a + i.numel()])).to(out.dtype)
        lse_hN[:, i] = l
    return out, lse_hN


class _SPAttention(torch.autograd.Function):
    """ttt_attention over an SP group: local causal block + gathered prefix block + diagonal keys."""

    @staticmethod
    def forward(ctx, q, seg: SPSegments, scale: float, num_keys: int, *kv):
        keys, values = kv[:num_keys], kv[num_keys:]
        out, lse, aux = flash_block_forward(q, keys[0], values[0], seg.causal_block(), scale)
        k_all, v_all = _gather(keys[0], seg.sp), _gather(values[0], seg.sp)  # every SP rank takes part
        aux_x = None
        if seg.has_prefix:
            out_x, lse_x, aux_x = flash_block_forward(q[seg.q_index], k_all[seg.k_index], v_all[seg.k_index],
                                                      seg.prefix, scale)
            out, lse = _merge_blocks(out, lse, seg.q_index, out_x, lse_x)
        del k_all, v_all  # gathered again in backward: O(T) memory only while one block runs
        if num_keys > 1:
            out, lse = merge_forward(q, out, lse, keys[1:], values[1:], scale)
        ctx.save_for_backward(q, out, lse, *kv)
        ctx.seg, ctx.scale, ctx.num_keys, ctx.aux, ctx.aux_x = seg, scale, num_keys, aux, aux_x
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, *kv = ctx.saved_tensors
        seg, scale = ctx.seg, ctx.scale
        keys, values = kv[:ctx.num_keys], kv[ctx.num_keys:]
        dout = dout.contiguous()
        dq, dk0, dv0 = flash_block_backward(dout, q, keys[0], values[0], out, lse, seg.causal_block(), scale,
                                            ctx.aux)
        dq = acc_dtype(dq)
        k_all, v_all = _gather(keys[0], seg.sp), _gather(values[0], seg.sp)
        dk_all = torch.zeros(k_all.shape, dtype=dq.dtype, device=dq.device)
        dv_all = torch.zeros_like(dk_all)
        if seg.has_prefix:
            i, j = seg.q_index, seg.k_index
            dq_x, dk_x, dv_x = flash_block_backward(dout[i], q[i], k_all[j], v_all[j], out[i],
                                                    lse[:, i].contiguous(), seg.prefix, scale, ctx.aux_x)
            dq.index_add_(0, i, acc_dtype(dq_x))
            dk_all.index_add_(0, j, acc_dtype(dk_x))
            dv_all.index_add_(0, j, acc_dtype(dv_x))
        del k_all, v_all
        dk0 = (acc_dtype(dk0) + _reduce_scatter(dk_all, seg.sp)).to(keys[0].dtype)
        dv0 = (acc_dtype(dv0) + _reduce_scatter(dv_all, seg.sp)).to(values[0].dtype)
        dks, dvs = [dk0], [dv0]
        if ctx.num_keys > 1:
            dq_diag, dk_diag, dv_diag = merge_backward(dout, q, out, lse, keys[1:], values[1:], scale)
            dq = dq + dq_diag
            dks += dk_diag
            dvs += dv_diag
        return (dq.to(q.dtype), None, None, None, *dks, *dvs)
