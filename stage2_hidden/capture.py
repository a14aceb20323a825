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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common.hf_target import AuxCapture, load_target_model, use_attention

PACKED_ATTN = "stage2_packed"


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     stage2_segments=None, **kwargs):
    """Causal attention inside each ``(start, end)`` segment of the packed row.

    query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None), as HF attention functions.
    """
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
