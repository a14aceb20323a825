"""The target: its preset (`conf/target/*.yaml`), its `config.json`, and the aux-layer ids the draft reads.

Aux-layer ids follow vLLM's convention: id j is the residual stream entering decoder layer j (HF
`hidden_states[j]`). One rule for every stage (`aux_layer_ids`), because both engines agree only on it:

* ascending: vLLM sorts the ids it captures and SGLang captures in layer order, so the draft's `fc` columns are in
  ascending layer order whatever the config says; ids in another order would train on a column order neither
  engine serves;
* 1 <= j <= N-1: SGLang captures `hidden_states + residual` before layer j, and before layer 0 there is no residual
  (id 0 would be served as something else than trained); id N is past the last layer;
* distinct; default (2, N//2, N-3), the engines' own default.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence


@dataclass
class TargetSpec:
    """A target preset (`conf/target/<name>.yaml`); every stage reads its target through this."""
    name: str                                   # short name, used in output paths
    path: str                                   # local HF folder or hub id
    hub_id: str | None = None                   # the original on the hub (documentation)
    served_name: str | None = None              # --served-model-name of the stage-1 / evaluation server
    max_model_len: int | None = 4096            # the server's --max-model-len
    context_length: int | None = None           # the target's max_position_embeddings (stage 2's default length)
    dtype: str = "bfloat16"                     # weights dtype for the server and the stage-2 forward
    trust_remote_code: bool = False             # never run model-repo code unless the preset opts in
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    # vLLM's parsers for this model (flags of the server stage 1 launches). Without a tool parser vLLM answers 400
    # to every request that carries `tools`; without a reasoning parser a thinking model's reasoning stays inline
    # in the content instead of coming back as the message's reasoning. null = the model has none.
    tool_call_parser: str | None = None         # --enable-auto-tool-choice --tool-call-parser NAME (e.g. hermes)
    reasoning_parser: str | None = None         # --reasoning-parser NAME (e.g. qwen3)

    def __post_init__(self) -> None:
        if not self.name or not self.path:
            raise ValueError(f"target preset needs name and path, got name={self.name!r} path={self.path!r} "
                             "(see conf/target/*.yaml)")
        self.served_name = self.served_name or self.name
        self.chat_template_kwargs = dict(self.chat_template_kwargs or {})
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"target.dtype must be bfloat16, float16 or float32, got {self.dtype!r}")

    @classmethod
    def from_mapping(cls, target: dict[str, Any]) -> "TargetSpec":
        """From the resolved `target:` group; an unknown key is a ValueError naming it (a typo in a preset)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(target) - known)
        if unknown:
            raise ValueError(f"unknown target.* keys {unknown}; known: {sorted(known)} (conf/target/*.yaml)")
        return cls(**dict(target))


def load_config_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(local folder, raw config.json dict) of a target; a hub id is resolved through the HF cache, fetching only
    json and safetensors files."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"]))
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"target {path}: no config.json in {folder}")
    return folder, json.loads(cfg_file.read_text())


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config.json dict (multimodal configs nest it under `text_config`)."""
    return cfg.get("text_config") or cfg


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """vLLM's and SGLang's default EAGLE-3 aux layers for a target with N decoder layers: (2, N//2, N-3)."""
    return [2, num_layers // 2, num_layers - 3]


def capturable_layer_ids(layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """What a forward pre-hook can capture at all: distinct ids in [0, N-1] (`aux_layer_ids` adds the engines' rule)."""
    ids = [int(j) for j in layer_ids]
    if not ids or len(set(ids)) != len(ids) or any(not 0 <= j < num_layers for j in ids):
        raise ValueError(f"layer_ids {ids} must be distinct integers in [0, {num_layers - 1}] "
                         f"(id j = input of decoder layer j; the target has {num_layers} layers)")
    return ids


def aux_layer_ids(configured: Sequence[int] | None, num_layers: int, where: str = "layer_ids") -> list[int]:
    """The aux-layer ids to use: `configured` (checked by the module docstring's rule) or the default."""
    ids = default_aux_layer_ids(num_layers) if configured is None else [int(j) for j in configured]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"{where} {ids}: need distinct layer ids")
    if 0 in ids:
        raise ValueError(f"{where} {ids}: id 0 (the embedding output) is not supported: SGLang captures "
                         "hidden_states + residual before layer j and layer 0 has no residual, so it would serve "
                         "another input than the one trained; use ids >= 1")
    if any(not 1 <= j <= num_layers - 1 for j in ids):
        raise ValueError(f"{where} {ids}: ids must lie in [1, {num_layers - 1}] (id j = input of decoder layer j; "
                         f"the target has {num_layers} layers)")
    if ids != sorted(ids):
        raise ValueError(f"{where} {ids}: ids must be ascending ({sorted(ids)}): vLLM sorts the layers it captures "
                         "and SGLang captures them in layer order, so the draft always sees them ascending")
    return ids
