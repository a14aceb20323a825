"""Decoding side of the draft's attention (gpt-fast style): a KV cache of rows and SDPA over them with a bool mask.

Training uses `attention.ttt_attention` (causal block + diagonal keys); decoding (evaluation/spec_decode.py) appends
each step's post-RoPE keys/values here and attends with an explicit mask [N, R] (chains, trees). Both are called
from the one `model.Attention.forward`, so projections, RoPE and everything around attention are shared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Decoding keys/values of the draft layer: rows [R, Hkv, D] in append order (keys post-RoPE), grown by doubling.

    gpt-fast's KVCache with a length instead of `input_pos` writes: `append` adds rows at the end, `truncate` drops
    the rows from a length on (e.g. last round's rejected guesses), `read` gives the R live rows, which the masks
    [N, R] of `cached_attention` index.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, capacity: int = 256, *, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.k_CkD = torch.empty(max(capacity, 1), num_kv_heads, head_dim, device=device, dtype=dtype)
        self.v_CkD = torch.empty_like(self.k_CkD)
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, k_NkD: torch.Tensor, v_NkD: torch.Tensor) -> None:
        end = self.length + k_NkD.shape[0]
        if end > self.k_CkD.shape[0]:  # reallocate at max(end, 2C) rows, keeping the live ones
            rows = max(end, 2 * self.k_CkD.shape[0])
            self.k_CkD, self.v_CkD = _grown(self.k_CkD, rows, self.length), _grown(self.v_CkD, rows, self.length)
        self.k_CkD[self.length:end] = k_NkD
        self.v_CkD[self.length:end] = v_NkD
        self.length = end

    def truncate(self, length: int) -> None:
        """Keep rows 0..length-1 (their storage is reused by the next append)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.truncate({length}) outside [0, {self.length}]")
        self.length = length

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [R, Hkv, D]: views of the live rows."""
        return self.k_CkD[:self.length], self.v_CkD[:self.length]


def _grown(x_CkD: torch.Tensor, rows: int, live: int) -> torch.Tensor:
    out_CkD = x_CkD.new_empty(rows, *x_CkD.shape[1:])
    out_CkD[:live] = x_CkD[:live]
    return out_CkD


def cached_attention(q_NhD: torch.Tensor, kv_cache: KVCache, mask_NR: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(D), masked) V over the R cache rows: query row n attends to the rows where mask_NR[n]
    (bool [N, R], True = attend); GQA heads share their kv head. -> [N, Hq, D]."""
    k_RkD, v_RkD = kv_cache.read()
    o_1hND = F.scaled_dot_product_attention(q_NhD.transpose(0, 1)[None], k_RkD.transpose(0, 1)[None],
                                            v_RkD.transpose(0, 1)[None], attn_mask=mask_NR[None, None],
                                            enable_gqa=True)
    return o_1hND[0].transpose(0, 1)
