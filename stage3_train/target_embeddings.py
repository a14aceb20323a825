"""The target's input embedding for the draft's frozen `embed_tokens`, read lazily from its safetensors (the only
I/O of stage 3's model code)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stage3_train.model import Eagle3Draft


def _safetensors_file_for(target_dir: Path, keys: tuple[str, ...]) -> tuple[Path, str] | None:
    index = target_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for key in keys:
            if key in weight_map:
                return target_dir / weight_map[key], key
        for name, file in weight_map.items():  # e.g. model.language_model.embed_tokens.weight
            if name.endswith(keys[0].split("model.", 1)[-1]) and "vision" not in name:
                return target_dir / file, name
        return None
    from safetensors import safe_open

    for file in sorted(target_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
        for key in keys:
            if key in names:
                return file, key
        for name in names:
            if name.endswith(keys[0].split("model.", 1)[-1]) and "vision" not in name:
                return file, name
    return None


@torch.no_grad()
def load_target_embeddings(model: Eagle3Draft, target_dir: str | Path) -> None:
    """Copy the target's input embedding into `model.embed_tokens` reading ONLY that tensor (safe_open, lazily).

    Looks for `model.embed_tokens.weight` (via the index json of sharded checkpoints); falls back to `lm_head.weight`
    only when the target ties its embeddings and stores just the head.
    """
    from safetensors import safe_open

    target_dir = Path(target_dir)
    if not target_dir.is_dir():
        raise ValueError(f"target folder {target_dir} does not exist")
    found = _safetensors_file_for(target_dir, ("model.embed_tokens.weight",))
    if found is None:
        cfg_file = target_dir / "config.json"
        tied = cfg_file.is_file() and json.loads(cfg_file.read_text()).get("tie_word_embeddings", False)
        found = _safetensors_file_for(target_dir, ("lm_head.weight",)) if tied else None
    if found is None:
        raise ValueError(f"no embed_tokens weight in the safetensors of {target_dir}")
    file, key = found
    with safe_open(str(file), framework="pt") as f:
        weight = f.get_tensor(key)
    if tuple(weight.shape) != tuple(model.embed_tokens.weight.shape):
        raise ValueError(f"{file.name}:{key} has shape {tuple(weight.shape)}, the draft expects "
                         f"{tuple(model.embed_tokens.weight.shape)} (vocab_size x hidden_size)")
    model.embed_tokens.weight.copy_(weight.to(model.embed_tokens.weight.dtype))
