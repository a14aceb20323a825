"""The target as an HF model: the one loader, the aux-layer capture, and custom attention functions.

* `load_target_model`: `AutoModelForCausalLM` from safetensors only, in eval mode with no gradients, on a device or
  spread by `device_map`; stage 2 and the offline evaluation both load the target through it.
* `AuxCapture`: forward *pre*-hooks on `model.model.layers[j]` keep the residual stream entering layer j (id j =
  HF `hidden_states[j]`), so only the aux layers stay alive, never `output_hidden_states=True`.
* `use_attention(model, name, fn)`: registers an HF attention function (with a mask factory that builds no mask:
  `fn` gets its own mask or segments through the forward's kwargs) the first time it is used, and switches the
  model to it. Nothing is registered at import time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from common.target import capturable_layer_ids

_REGISTERED: set[str] = set()


def load_target_model(path: str, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu",
                      device_map: str | None = None, trust_remote_code: bool = False):
    """HF causal LM in eval mode, no grads, safetensors only (sdpa attention until `use_attention`)."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, attn_implementation="sdpa")
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not device_map:
        model.to(device)
    return model.eval().requires_grad_(False)


def _no_mask(*args, **kwargs):
    return None


def use_attention(model, name: str, fn: Callable) -> None:
    """Switch `model` to the attention function `fn` under `name` (registered with HF on first use)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if name not in _REGISTERED:
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _no_mask)
        _REGISTERED.add(name)
    model.set_attn_implementation(name)


class AuxCapture:
    """Keeps the inputs of the decoder layers `layer_ids` during a forward; `pop()` returns them in that order."""

    def __init__(self, model, layer_ids: Sequence[int]):
        layers = model.model.layers
        self.layer_ids = capturable_layer_ids(layer_ids, len(layers))
        self._saved: dict[int, torch.Tensor] = {}
        self._hooks = [layers[j].register_forward_pre_hook(self._saver(j), with_kwargs=True) for j in self.layer_ids]

    def _saver(self, j: int):
        def save(module, args, kwargs):
            self._saved[j] = args[0] if args else kwargs["hidden_states"]
        return save

    def clear(self) -> None:
        self._saved.clear()

    def pop(self) -> list[torch.Tensor]:
        """The captured [B, T, H] inputs of the aux layers of the last forward, in `layer_ids` order."""
        return [self._saved.pop(j) for j in self.layer_ids]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
