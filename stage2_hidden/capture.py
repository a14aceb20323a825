"""Target forward: aux-layer hidden states and the top-1 next token, several conversations per forward.

* Layer id j is HF ``hidden_states[j]``: the residual stream entering decoder layer j (j = 0 is the
  embedding output). It is captured with a forward *pre*-hook on ``model.model.layers[j]``, so only the
  three aux layers are kept alive, never ``output_hidden_states=True``.
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
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

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


def _no_mask(*args, **kwargs):
    """Mask factory for ``stage2_packed``: the segments replace the mask."""
    return None


AttentionInterface.register(PACKED_ATTN, packed_attention)
AttentionMaskInterface.register(PACKED_ATTN, _no_mask)


def default_layer_ids(num_layers: int) -> list[int]:
    """vLLM's EAGLE-3 default aux layers: [2, N//2, N-3]."""
    return [2, num_layers // 2, num_layers - 3]


def validate_layer_ids(layer_ids, num_layers: int) -> list[int]:
    ids = [int(j) for j in layer_ids]
    if not ids or len(set(ids)) != len(ids) or any(not 0 <= j < num_layers for j in ids):
        raise ValueError(f"layer_ids {ids} must be distinct integers in [0, {num_layers - 1}] "
                         f"(id j = input of decoder layer j; the target has {num_layers} layers)")
    return ids


def load_target(path: str, dtype: str = "bfloat16", device: str = "cpu", device_map: str | None = None,
                trust_remote_code: bool = False):
    """HF causal LM in eval mode with the packed attention (safetensors only)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True,
                  attn_implementation="sdpa")
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not device_map:
        model.to(device)
    return prepare_model(model)


def prepare_model(model):
    """Switch a loaded HF causal LM to packed attention, eval mode, no grads."""
    model.eval().requires_grad_(False)
    model.set_attn_implementation(PACKED_ATTN)
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
        self.layers = model.model.layers
        self.layer_ids = validate_layer_ids(layer_ids, len(self.layers))
        self.lm_head_chunk = int(lm_head_chunk)
        self._saved: dict[int, torch.Tensor] = {}
        self._hooks = [self.layers[j].register_forward_pre_hook(self._hook(j), with_kwargs=True)
                       for j in self.layer_ids]

    def _hook(self, j: int):
        def save(module, args, kwargs):
            self._saved[j] = args[0] if args else kwargs["hidden_states"]
        return save

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

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
        self._saved.clear()
        last_1TH = self.model.model(input_ids=ids_1T, position_ids=pos_1T, use_cache=False,
                                    stage2_segments=segments).last_hidden_state
        aux = [self._saved.pop(j)[0] for j in self.layer_ids]           # num_aux x [T, H]
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
