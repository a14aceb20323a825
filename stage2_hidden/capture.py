"""Target forward: aux-layer hidden states and the top-1 next token, several conversations per forward.

* Layer id j is HF ``hidden_states[j]``: the residual stream entering decoder layer j (j = 0 is the
  embedding output), captured by ``common.hf_target.AuxCapture`` (forward pre-hooks: only the aux layers
  are kept alive, never ``output_hidden_states=True``).
* ``target_ids[t] = argmax_v (norm(h_N[t]) @ W_lm^T)[v]``: the body (``model.model``) returns the final
  normed hidden state and the lm_head is applied ``lm_head_chunk`` tokens at a time, so no ``[T, V]``
  logits tensor exists (at 128K tokens and V = 128K that would be 32 GiB in bf16).
* Packing: conversations are concatenated into one row ``[1, sum T_i]`` with ``position_ids`` restarting
  at 0 per conversation. Attention must not cross conversation borders, so the model runs with the
  attention function ``stage2_packed`` registered below: for each conversation segment it calls HF's
  own sdpa path with ``is_causal=True`` on the slice (flash / efficient kernels on GPU, O(T) memory,
  no ``[T, T]`` mask, no work on the off-diagonal blocks). Everything else in a decoder layer is
  per-token, so the packed forward equals the separate forwards up to kernel rounding.
* Sliding windows and attention sinks (gpt-oss: every other layer attends to the last ``sliding_window`` = 128
  keys, and every head has a learned sink logit ``s_aux`` that joins the softmax and is dropped from the output).
  HF passes both to the attention function; ``packed_attention`` honours them (``sink_attention``): on CUDA one
  varlen flash call over all segments (``torch.nn.attention.varlen.varlen_attn`` with ``window_size`` and the
  log-sum-exp), the sink applied exactly afterwards as ``out * sigmoid(lse - sink)`` (softmax over
  ``[scores, sink]`` = softmax over scores times ``Z / (Z + e^sink)``). Where that torch API is missing
  (torch 2.11's ``varlen_attn`` has no ``enable_gqa``: the H200 profile of 2026-12-02 found every gpt-oss layer on
  the fallback, fp32 ``bmm`` + softmax = most of the forward, 2.6K tokens/s at 32K): a full-attention layer runs
  SDPA's fused causal kernel per segment through the aten op that also returns the log-sum-exp
  (``_scaled_dot_product_flash_attention``, ``..._for_cpu`` on CPU; keys/values repeated to the query heads)
  and takes the same sink gate, and a window layer a blockwise exact softmax in fp32 (query blocks against only
  the keys they may see: O(T * window), memory bounded). Whatever path a layer falls back to is logged once. Key j
  is visible from query i iff ``i - window < j <= i`` (HF's ``sliding_window_overlay``; flash's left window is
  ``window - 1``).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common.hf_target import AuxCapture, load_target_model, use_attention

PACKED_ATTN = "stage2_packed"
log = logging.getLogger(__name__)


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     stage2_segments=None, sliding_window=None, s_aux=None, **kwargs):
    """Causal attention inside each ``(start, end)`` segment of the packed row (sliding window and sinks honoured).

    query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None), as HF attention functions.
    """
    if s_aux is not None or sliding_window:
        segments = stage2_segments or [(0, query.shape[2])]
        return sink_attention(query, key, value, segments, scaling, sliding_window, s_aux), None
    if not stage2_segments or len(stage2_segments) == 1:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True)
    out_BTHD = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for start, end in stage2_segments:
        seg, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                        value[:, :, start:end], None, dropout=dropout, scaling=scaling,
                                        is_causal=True)
        out_BTHD[:, start:end] = seg
    return out_BTHD, None


def sink_attention(query, key, value, segments, scaling=None, sliding_window=None, sinks=None,
                   block_bytes: int = 1 << 30) -> torch.Tensor:
    """Causal attention per segment with an optional sliding window and per-head sink logits -> [B, T, Hq, D]."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = int(sliding_window) if sliding_window else None
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None:
        try:
            return _sink_attention_varlen(query, key, value, segments, scale, window, sinks)
        except torch.OutOfMemoryError:
            raise                          # the blockwise path would need more memory, not less
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:  # an older torch / kernel refused it
            _log_once(f"varlen flash attention refused ({type(e).__name__}: {str(e)[:200]}); using the per-segment path")
    out_BTHD = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for start, end in segments:
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        seg = _sink_attention_fused(q, k, v, scale, sinks) if window is None else None
        if seg is None:
            seg = _sink_attention_blockwise(q, k, v, scale, window, sinks, block_bytes)
        out_BTHD[:, start:end] = seg
    return out_BTHD


@functools.cache
def _log_once(message: str) -> None:
    log.warning(message)


def _causal_attention_with_lse(q, k, v, scale):
    """SDPA's fused causal kernel that also returns the log-sum-exp: (out [B, H, T, D], lse [B, H, T] fp32), or
    None where this torch has no such op for the device / dtype. q, k, v: [B, H, T, D], the same H."""
    try:
        if q.is_cuda:
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
        else:
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    except torch.OutOfMemoryError:
        raise
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        _log_once(f"fused causal attention with log-sum-exp unavailable ({type(e).__name__}: {str(e)[:200]}); "
                  "full-attention layers with sinks use the fp32 blockwise softmax (slow at long context)")
        return None
    return out[0], out[1]


def _sink_attention_fused(q, k, v, scale, sinks) -> torch.Tensor | None:
    """Full causal attention with per-head sink logits from the fused kernel -> [B, T, Hq, D] (None: no kernel).

    softmax over ``[scores_i, sink]`` = softmax over ``scores_i`` times ``Z_i / (Z_i + e^sink)``
    = ``out_i * sigmoid(lse_i - sink)``, with ``lse_i = log Z_i`` from the kernel: exact, no [T, T] tensor."""
    G = q.shape[1] // k.shape[1]
    if G > 1:   # the aten op wants as many key/value heads as query heads (kv head h serves queries h*G .. h*G+G-1)
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    res = _causal_attention_with_lse(q.contiguous(), k.contiguous(), v.contiguous(), scale)
    if res is None:
        return None
    out_BHTD, lse_BHT = res
    lse_BHT = lse_BHT[..., :q.shape[2]]          # some kernels pad the lse's sequence dimension
    if sinks is not None:
        gate_BHT = torch.sigmoid(lse_BHT.float() - sinks.float()[None, :, None])
        out_BHTD = (out_BHTD.float() * gate_BHT[..., None]).to(q.dtype)
    return out_BHTD.transpose(1, 2)


@functools.cache
def _varlen_attn():
    """torch's varlen flash attention with ``window_size``, ``enable_gqa`` and the lse, or None."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if {"window_size", "enable_gqa", "return_aux"} <= set(params) else None


def _sink_attention_varlen(query, key, value, segments, scale, window, sinks) -> torch.Tensor:
    from torch.nn.attention.varlen import AuxRequest

    B, Hq, T, D = query.shape
    bounds = [0] + [end for _, end in segments]
    outs = []
    for b in range(B):  # stage 2 packs into one row: B == 1
        cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
        max_len = max(end - start for start, end in segments)
        q_THD, k_THD, v_THD = (x[b].transpose(0, 1).contiguous() for x in (query, key, value))
        out_THD, lse = _varlen_attn()(q_THD, k_THD, v_THD, cu, cu, max_len, max_len, scale=scale,
                                      window_size=(window - 1 if window else -1, 0), enable_gqa=Hq != key.shape[1],
                                      return_aux=AuxRequest(lse=True))
        if sinks is not None:
            lse_TH = lse.transpose(0, 1) if lse.shape[0] == Hq and lse.shape[1] == T else lse  # (H, T) or (T, H)
            gate_TH = torch.sigmoid(lse_TH.float() - sinks.float()[None, :])
            out_THD = (out_THD.float() * gate_TH[..., None]).to(query.dtype)
        outs.append(out_THD)
    return torch.stack(outs)


def _sink_attention_blockwise(q, k, v, scale, window, sinks, block_bytes) -> torch.Tensor:
    """Exact reference: fp32 softmax over ``[visible scores, sink]`` one query block at a time -> [B, T, Hq, D]."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q5 = q.reshape(B, Hkv, G, T, D)
    out = q.new_empty(B, T, Hq, D)
    if window:   # a block of bq queries sees bq + window - 1 keys: fixed blocks, O(T * window) in all
        bq = max(1, min(T, 512, block_bytes // (4 * B * Hq * (512 + window))))
    else:        # fp32 scores [B, Hq, bq, T] within block_bytes
        bq = max(1, min(T, block_bytes // (4 * B * Hq * T)))
    sink_5 = sinks.float().reshape(1, Hkv, G, 1, 1) if sinks is not None else None
    for qs in range(0, T, bq):
        qe = min(T, qs + bq)
        ks = max(0, qs - window + 1) if window else 0
        s_5 = torch.matmul(q5[:, :, :, qs:qe].float(), k[:, :, None, ks:qe].float().transpose(-1, -2)) * scale
        i = torch.arange(qs, qe, device=q.device)[:, None]
        j = torch.arange(ks, qe, device=q.device)[None, :]
        visible = j <= i
        if window:
            visible &= j > i - window
        s_5 = s_5.masked_fill(~visible, float("-inf"))
        if sink_5 is not None:
            s_5 = torch.cat([s_5, sink_5.expand(B, Hkv, G, qe - qs, 1)], dim=-1)
        p_5 = torch.softmax(s_5, dim=-1)
        if sink_5 is not None:
            p_5 = p_5[..., :-1]
        o_5 = torch.matmul(p_5, v[:, :, None, ks:qe].float())          # [B, Hkv, G, bq, D]
        out[:, qs:qe] = o_5.reshape(B, Hq, qe - qs, D).transpose(1, 2).to(q.dtype)
    return out


def load_target(path: str, dtype: str = "bfloat16", device: str = "cpu", device_map: str | None = None,
                trust_remote_code: bool = False):
    """The target (common.hf_target's loader) with the packed attention."""
    return prepare_model(load_target_model(path, dtype, device, device_map, trust_remote_code))


def prepare_model(model):
    """Switch a loaded HF causal LM to packed attention, eval mode, no grads."""
    model.eval().requires_grad_(False)
    use_attention(model, PACKED_ATTN, packed_attention)
    return model


@dataclass
class Capture:
    """Outputs of one packed forward, still on the device."""
    hidden_TW: torch.Tensor   # [T, num_aux * H] aux layers concatenated in layer_ids order
    target_T: torch.Tensor    # [T] int32 argmax of the logits


class HiddenCapture:
    """Runs packed forwards of ``model`` and returns the aux hidden states and argmax tokens."""

    def __init__(self, model, layer_ids, lm_head_chunk: int = 4096):
        self.model = model
        self.aux = AuxCapture(model, layer_ids)
        self.layer_ids = self.aux.layer_ids
        self.lm_head_chunk = int(lm_head_chunk)

    def close(self) -> None:
        self.aux.close()

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(self, seqs: list[torch.Tensor]) -> Capture:
        """seqs: 1-D int token tensors (one per conversation), packed into one row."""
        lengths = [len(s) for s in seqs]
        bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
        segments = list(zip(bounds[:-1], bounds[1:]))
        ids_1T = torch.cat(seqs).to(self.device, torch.long, non_blocking=True)[None]
        pos_1T = torch.cat([torch.arange(n) for n in lengths]).to(self.device, non_blocking=True)[None]
        self.aux.clear()
        last_1TH = self.model.model(input_ids=ids_1T, position_ids=pos_1T, use_cache=False,
                                    stage2_segments=segments).last_hidden_state
        aux = [a[0] for a in self.aux.pop()]                            # num_aux x [T, H]
        out_dev = aux[0].device
        hidden_TW = torch.cat([a.to(out_dev) for a in aux], dim=-1)     # [T, num_aux * H]
        return Capture(hidden_TW, self.argmax_chunked(last_1TH[0]).to(out_dev))

    def argmax_chunked(self, last_TH: torch.Tensor) -> torch.Tensor:
        """argmax of ``lm_head(last_TH)`` over the vocab, ``lm_head_chunk`` tokens at a time -> int32 [T]."""
        head = self.model.get_output_embeddings()
        w_VH = head.weight
        last_TH = last_TH.to(w_VH.device)
        out_T = torch.empty(last_TH.shape[0], dtype=torch.int32, device=w_VH.device)
        for s in range(0, last_TH.shape[0], self.lm_head_chunk):
            logits_CV = head(last_TH[s: s + self.lm_head_chunk])        # [chunk, V]
            out_T[s: s + self.lm_head_chunk] = logits_CV.argmax(dim=-1)
        return out_T


def pack_groups(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Greedy packing in input order: consecutive rows share a forward while their total fits
    ``batch_tokens``; a longer row runs alone. Deterministic from the lengths alone."""
    groups, cur, cur_tokens = [], [], 0
    for i, n in enumerate(lengths):
        if cur and cur_tokens + n > batch_tokens:
            groups.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        groups.append(cur)
    return groups
