"""Read the EAGLE-3 draft folders people publish, into this project's export layout (for `train.init_from`).

Layouts read (each checked against the code that serves it):

* SpecForge / EAGLE reference / this project: `midlayer.*`, `fc.weight`, `norm.weight`, `lm_head.weight`,
  optionally `embed_tokens.weight` and `d2t`/`t2d`, any of them under a `model.` prefix; config.json a Llama config
  with `architectures` LlamaForCausalLMEagle3 (SGLang's and SpecForge's name) or Eagle3LlamaForCausalLM (vLLM's),
  `draft_vocab_size`, and the aux layer ids at the top level (vLLM ids) or in `eagle_config` (SGLang ids, + 1).
* vLLM speculators: tensors `layers.0.*` (vLLM's Eagle3LlamaForCausalLM maps `midlayer.` -> `layers.0.` in its
  `hf_to_vllm_mapper` and prefixes `model.`, vllm/model_executor/models/llama_eagle3.py), config.json with
  `speculators_model_type: "eagle3"`, the layer's Llama config under `transformer_layer_config` and
  `draft_vocab_size`, `target_hidden_size`, `norm_before_residual` (default TRUE there), `norm_before_fc`,
  `eagle_aux_hidden_state_layer_ids` at the top level (vllm/transformers_utils/configs/speculators/base.py
  `extract_transformers_pre_trained_config`, algos.py `update_eagle3`).
* Weights in `*.safetensors` or, as the EAGLE reference publishes them, `pytorch_model.bin`.

`embed_tokens` is dropped (the target's is used, frozen). Without d2t/t2d the draft vocabulary must be the whole
target vocabulary; one of the two is enough (the other follows). Any tensor this project's draft has no place for
is refused by name rather than dropped: dropping it would fine-tune another function than the one published.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCHS = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Speculator")
WEIGHT_KEYS = (
    "fc.weight", "norm.weight", "lm_head.weight",
    "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
)
VOCAB_KEYS = ("d2t", "t2d")
# speculators options this project's draft does not have: a folder using them is refused, naming the option
UNSUPPORTED_FLAGS = ("norm_before_fc", "fc_norm", "norm_output")


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a published draft, flattened to one Llama-style dict (speculators' nesting undone)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json")
    raw = json.loads(path.read_text())
    if raw.get("speculators_model_type") is not None:
        if raw["speculators_model_type"] != "eagle3":
            raise ValueError(f"{path}: speculators_model_type {raw['speculators_model_type']!r} is not eagle3")
        layer = raw.get("transformer_layer_config")
        if not isinstance(layer, dict):
            raise ValueError(f"{path}: a speculators config needs a transformer_layer_config dict")
        config = {**layer, "architectures": ["Eagle3Speculator"], "draft_vocab_size": raw.get("draft_vocab_size"),
                  # vLLM's update_eagle3 defaults it to True when the key is missing
                  "norm_before_residual": bool(raw.get("norm_before_residual", True))}
        for key in ("target_hidden_size", "eagle_aux_hidden_state_layer_ids", *UNSUPPORTED_FLAGS):
            if raw.get(key) is not None:
                config[key] = raw[key]
    else:
        config = dict(raw)
        if not set(ARCHS) & set(config.get("architectures") or []):
            raise ValueError(f"{path}: architectures {config.get('architectures')} is not EAGLE-3 Llama "
                             f"(one of {list(ARCHS)}, or a speculators config)")
    used = [k for k in UNSUPPORTED_FLAGS if config.get(k)]
    if used:
        raise ValueError(f"{path}: {used} set; this project's draft has no such norms (cannot fine-tune it)")
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if config.get(key) is None:
            raise ValueError(f"{path}: missing {key}")
    if int(config.get("num_hidden_layers", 1)) != 1:
        raise ValueError(f"{path}: num_hidden_layers {config['num_hidden_layers']}; only one-layer drafts load")
    return config


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's weight files, names as published."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            tensors.update(load_file(str(f)))
    elif (folder / "pytorch_model.bin").is_file():
        tensors = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{folder} has no .safetensors file (nor pytorch_model.bin)")
    return tensors


def canonical_name(name: str) -> str | None:
    """A published tensor name -> this project's (None = dropped: the target's embedding is used instead)."""
    name = name.removeprefix("model.")
    if "embed_tokens" in name:
        return None
    if name.startswith("layers.0."):                      # vLLM speculators' name of the one layer
        name = "midlayer." + name.removeprefix("layers.0.")
    elif name.startswith("midlayers.0."):                 # SGLang's prefix for the same module
        name = "midlayer." + name.removeprefix("midlayers.0.")
    return name


def canonical_tensors(tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        key = canonical_name(name)
        if key is not None:
            out[key] = value
    unknown = sorted(k for k in out if k not in WEIGHT_KEYS + VOCAB_KEYS)
    if unknown:
        raise ValueError(f"{folder}: tensors {unknown} have no place in this project's one-layer draft")
    missing = [k for k in WEIGHT_KEYS if k not in out]
    if missing:
        raise ValueError(f"{folder}: missing tensors {missing}")
    return out


def complete_vocab(config: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Give `tensors` both d2t (int64 [Vd]) and t2d (bool [V]), consistent with config.json and lm_head."""
    vocab = int(config["vocab_size"])
    rows = int(tensors["lm_head.weight"].shape[0])
    draft_vocab = int(config.get("draft_vocab_size") or rows)
    if rows != draft_vocab:
        raise ValueError(f"{folder}: lm_head.weight has {rows} rows, config.json draft_vocab_size is {draft_vocab}")
    if "d2t" not in tensors and "t2d" in tensors:       # t2d alone: its set tokens, ascending, are the draft ids
        tok = torch.nonzero(tensors["t2d"].bool()).flatten()
        tensors["d2t"] = tok - torch.arange(len(tok))
    if "d2t" not in tensors:
        if draft_vocab != vocab:
            raise ValueError(f"{folder}: no d2t/t2d tensors but draft_vocab_size {draft_vocab} != vocab_size "
                             f"{vocab}: the draft-to-target token mapping is unknown")
        tensors["d2t"] = torch.zeros(draft_vocab, dtype=torch.long)
    d2t = tensors["d2t"].long()
    if len(d2t) != draft_vocab:
        raise ValueError(f"{folder}: d2t has {len(d2t)} entries, draft_vocab_size is {draft_vocab}")
    target = d2t + torch.arange(draft_vocab)
    if len(target) and (int(target.min()) < 0 or int(target.max()) >= vocab or len(target.unique()) != draft_vocab):
        raise ValueError(f"{folder}: d2t maps draft ids to target ids outside [0, {vocab}) or to one id twice")
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[target] = True
    if "t2d" in tensors and not torch.equal(tensors["t2d"].bool(), t2d):
        raise ValueError(f"{folder}: t2d does not match d2t (t2d must mark exactly the target ids draft id + d2t)")
    tensors["d2t"], tensors["t2d"] = d2t, t2d


def read_published(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(flat config, tensors in this project's names with d2t and t2d) of any layout above."""
    folder = Path(folder)
    config = read_config(folder)
    tensors = canonical_tensors(read_tensors(folder), folder)
    complete_vocab(config, tensors, folder)
    return config, tensors


def check_matches(config: dict[str, Any], tensors: dict[str, torch.Tensor], model, folder: Path) -> None:
    """Refuse, naming the first mismatch, a published draft that cannot initialise `model` (an Eagle3Draft built for
    the target and shards): the target vocabulary, the head/attention shape, norm placement, every weight's shape."""
    mine = model.config
    if int(config["vocab_size"]) != int(mine.vocab_size):
        raise ValueError(f"{folder}: vocab_size {config['vocab_size']} != the target's {mine.vocab_size} "
                         "(a draft for another tokenizer)")
    heads = int(config["num_attention_heads"])
    theirs = {"num_attention_heads": heads, "num_key_value_heads": int(config.get("num_key_value_heads") or heads),
              "head_dim": int(config.get("head_dim") or int(config["hidden_size"]) // heads),
              "hidden_size": int(config["hidden_size"]),
              "norm_before_residual": bool(config.get("norm_before_residual", False))}
    for key, value in theirs.items():
        if value != getattr(mine, key):
            hint = " (train.advanced.draft_overrides can set it)" if key == "norm_before_residual" else ""
            raise ValueError(f"{folder}: config.json {key} = {value}, the draft built for this target has "
                             f"{getattr(mine, key)}{hint}")
    own = model.state_dict()
    for key in WEIGHT_KEYS:
        got, want = tuple(tensors[key].shape), tuple(own[key].shape)
        if key == "lm_head.weight":                         # rows may differ: the draft vocabularies are remapped
            got, want = got[1:], want[1:]
        if got != want:
            what = " (fc is [hidden, num_aux_layers * target_hidden_size])" if key == "fc.weight" else ""
            raise ValueError(f"{folder}: {key} has shape {tuple(tensors[key].shape)}, the draft built for these "
                             f"shards has {tuple(own[key].shape)}{what}")
