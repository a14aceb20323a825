"""What SGLang's EAGLE-3 loader reads from an export folder, written down as a check (SGLang cannot be installed
here, so this module is the SGLang side of the export's contract; vLLM is verified by serving, see tests).

Sources (sgl-project/sglang, python/sglang/srt/, read at commit 03d5a7771f6082e7737a5f19cae7d1e863087013):

* models/llama_eagle3.py
  - `LlamaModel.__init__`: `fc = Linear(hidden_size_in * 3, hidden_size)` with `hidden_size_in =
    config.target_hidden_size` when the config has it, else `hidden_size`: THREE aux layers, hard-coded (an fc of
    another width fails to load). `midlayer` is the one EAGLE layer; `num_hidden_layers > 1` adds
    `additional_layers` (plain decoder layers) that this project never trains.
  - `LlamaDecoderLayer.__init__`: `qkv_proj` input is `2 * hidden_size` (embeds ++ hidden); heads, kv heads and
    `head_dim` come from the Llama attention (`getattr(config, "head_dim", hidden_size // num_attention_heads)`).
  - `LlamaDecoderLayer.forward`: `residual = hidden_states` BEFORE `hidden_norm`: `norm_before_residual` is not
    read at all (a draft trained with it serves another function).
  - `LlamaForCausalLMEagle3.__init__`: `tie_word_embeddings` true makes `lm_head = embed_tokens` (the trained head
    is dropped); else `ParallelLMHead(config.draft_vocab_size, hidden_size)`, and a `draft_vocab_size` of None
    means the full vocabulary with the head loaded from the target.
  - `load_weights`: a name containing `d2t` becomes `hot_token_id = d2t + arange(len(d2t))` (target id = draft id
    + d2t[id]); `t2d` is skipped; `.q_proj/.k_proj/.v_proj` -> `.qkv_proj`, `.gate_proj/.up_proj` ->
    `.gate_up_proj`; a name is looked up as is, else as `model.<name>` (so `midlayer.*`, `fc.weight`,
    `norm.weight` land under `model.`, `lm_head.weight` as is); a name matching no parameter is DROPPED silently
    (e.g. vLLM speculators' `layers.0.*`), leaving that parameter at its random init. No `embed_tokens` in the
    file: the EAGLE worker shares the target's embedding.
* model_executor/model_runner.py (`ModelRunner.__init__`, EAGLE3 branch): the aux layers come ONLY from the
  draft's `eagle_config["eagle_aux_hidden_state_layer_ids"]` (`eagle_config.get("use_aux_hidden_state", True)`);
  no eagle_config -> None -> the target's default. The top-level `eagle_aux_hidden_state_layer_ids` (vLLM's) is
  not read.
* models/llama.py (`LlamaForCausalLM.set_eagle3_layers_to_capture`): `layers_to_capture = [i + 1 for i in ids]`,
  default `[2, N // 2, N - 3]`; the capture before layer j is `hidden_states + residual`, in layer order.
  `LlamaAttention` reads `rope_theta = getattr(config, "rope_theta", 10000)` and
  `rope_scaling = getattr(config, "rope_scaling", None)` at the TOP LEVEL of config.json (a transformers-5
  `rope_parameters` alone means theta 10000 there).

`check(config, tensors, num_target_layers)` returns the problems; `Problem.level` is "error" (SGLang would load
something else than what was trained, or fail) or "warning" (SGLang cannot serve an option vLLM serves).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

ENGINE = "SGLang"
ARCH = "LlamaForCausalLMEagle3"  # llama_eagle3.py's EntryClass
NUM_AUX = 3                      # LlamaModel.fc width: target_hidden_size * 3
STACKED = ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
           (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj"))
# SGLang's parameter names of a one-layer draft (LlamaForCausalLMEagle3.named_parameters, tie_word_embeddings off)
PARAMS = ("model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight",
          "model.midlayer.input_layernorm.weight", "model.midlayer.hidden_norm.weight",
          "model.midlayer.post_attention_layernorm.weight", "model.midlayer.self_attn.qkv_proj.weight",
          "model.midlayer.self_attn.o_proj.weight", "model.midlayer.mlp.gate_up_proj.weight",
          "model.midlayer.mlp.down_proj.weight")
SHARED = ("model.embed_tokens.weight",)  # the worker takes the target's when the file has none


@dataclass(frozen=True)
class Problem:
    level: str   # "error" | "warning"
    field: str   # the config.json key or tensor name
    message: str

    def __str__(self) -> str:
        return f"{ENGINE}: {self.field}: {self.message}"


def sglang_param(name: str) -> str | None:
    """The SGLang parameter a tensor name loads into (load_weights' mapping), or None for d2t/t2d."""
    if "d2t" in name or "t2d" in name:
        return None
    for old, new in STACKED:
        if old in name:
            name = name.replace(old, new)
            break
    return name if name in PARAMS else f"model.{name}"


def _rope_problems(config: Mapping[str, Any]) -> list[Problem]:
    out = []
    params = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    if "rope_theta" not in config:
        out.append(Problem("error", "rope_theta", "missing at the top level: SGLang's Llama attention then uses "
                           f"10000 (the target's is {theta})"))
    elif theta is not None and float(config["rope_theta"]) != float(theta):
        out.append(Problem("error", "rope_theta", f"{config['rope_theta']} != rope_parameters.rope_theta {theta}"))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default" and not config.get("rope_scaling"):
        out.append(Problem("error", "rope_scaling", f"missing at the top level for rope_type {kind!r}: SGLang would "
                           "serve unscaled RoPE"))
    return out


def _layer_problems(config: Mapping[str, Any], num_target_layers: int | None) -> list[Problem]:
    eagle = config.get("eagle_config") or {}
    if not eagle.get("use_aux_hidden_state", True):
        return [Problem("error", "eagle_config.use_aux_hidden_state", "false: SGLang would feed no aux layers")]
    served = eagle.get("eagle_aux_hidden_state_layer_ids")
    served = [int(i) + 1 for i in served] if served else None      # SGLang captures id + 1
    if served is None and num_target_layers is not None:
        served = [2, num_target_layers // 2, num_target_layers - 3]
    trained = config.get("eagle_aux_hidden_state_layer_ids")        # vLLM convention, as trained
    if trained is None and num_target_layers is not None:
        trained = [2, num_target_layers // 2, num_target_layers - 3]
    if served is not None and trained is not None and list(served) != [int(i) for i in trained]:
        return [Problem("error", "eagle_config.eagle_aux_hidden_state_layer_ids",
                        f"SGLang captures layers {served} (these ids + 1, or its default), the draft was trained on "
                        f"{list(trained)}")]
    return []


def _tensor_problems(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> list[Problem]:
    out = []
    mapped = {}
    for name in tensors:
        param = sglang_param(name)
        if param is None:
            continue
        if param not in PARAMS:
            out.append(Problem("error", name, f"maps to no SGLang parameter ({param}): load_weights drops it "
                               "silently and that weight stays random"))
        mapped.setdefault(param, name)
    for param in PARAMS:
        if param not in mapped and param not in SHARED:
            out.append(Problem("error", param, "no tensor loads into it (it would stay at its random init)"))
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    target_hidden = int(config.get("target_hidden_size") or hidden)
    fc = tensors.get("fc.weight")
    if fc is not None and tuple(fc.shape) != (hidden, NUM_AUX * target_hidden):
        out.append(Problem("warning", "fc.weight", f"shape {tuple(fc.shape)}: SGLang hard-codes three aux layers "
                           f"(fc is [{hidden}, 3 * {target_hidden}]) and cannot load this draft; vLLM can"))
    q = tensors.get("midlayer.self_attn.q_proj.weight")
    if q is not None and tuple(q.shape) != (heads * head_dim, 2 * hidden):
        out.append(Problem("error", "midlayer.self_attn.q_proj.weight", f"shape {tuple(q.shape)} != "
                           f"({heads} heads * {head_dim} head_dim, 2 * hidden_size {hidden})"))
    vocab = int(config["vocab_size"])
    draft_vocab = config.get("draft_vocab_size")
    head = tensors.get("lm_head.weight")
    if draft_vocab is None:
        out.append(Problem("error", "draft_vocab_size", "missing: SGLang then builds a full-vocabulary head loaded "
                           "from the target"))
    elif head is not None and head.shape[0] != int(draft_vocab):
        out.append(Problem("error", "draft_vocab_size", f"{draft_vocab} != lm_head rows {head.shape[0]}"))
    d2t = tensors.get("d2t")
    if draft_vocab is not None and int(draft_vocab) < vocab and d2t is None:
        out.append(Problem("error", "d2t", f"missing with draft_vocab_size {draft_vocab} < vocab_size {vocab}: "
                           "SGLang would read draft ids as target ids"))
    if d2t is not None:
        target = d2t.long() + torch.arange(len(d2t))                 # hot_token_id
        if draft_vocab is not None and len(d2t) != int(draft_vocab):
            out.append(Problem("error", "d2t", f"length {len(d2t)} != draft_vocab_size {draft_vocab}"))
        if len(target) and (int(target.min()) < 0 or int(target.max()) >= vocab or
                            len(torch.unique(target)) != len(target)):
            out.append(Problem("error", "d2t", f"draft id + d2t must be distinct target ids in [0, {vocab})"))
    return out


def check(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
          num_target_layers: int | None = None) -> list[Problem]:
    """Problems SGLang would have serving this export folder (config.json dict, the safetensors' tensors)."""
    out: list[Problem] = []
    if ARCH not in (config.get("architectures") or []):
        out.append(Problem("error", "architectures", f"{config.get('architectures')} lacks {ARCH!r}"))
    if int(config.get("num_hidden_layers", 1)) != 1:
        out.append(Problem("error", "num_hidden_layers", f"{config.get('num_hidden_layers')}: SGLang adds plain "
                           "decoder layers after midlayer; this project exports one layer"))
    if config.get("tie_word_embeddings"):
        out.append(Problem("error", "tie_word_embeddings", "true: SGLang uses embed_tokens as lm_head and drops "
                           "the trained head"))
    if config.get("norm_before_residual"):
        out.append(Problem("warning", "norm_before_residual", "true: SGLang ignores it (its midlayer takes the "
                           "residual before hidden_norm), so it serves another function than trained; vLLM honours "
                           "it"))
    out += _rope_problems(config) + _layer_problems(config, num_target_layers) + _tensor_problems(config, tensors)
    return out
