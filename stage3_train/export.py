"""Export a trained draft as a folder vLLM and SGLang load as is, and import such a folder back for fine-tuning.

    python -m stage3_train.export CKPT OUT     # CKPT: a step-N checkpoint folder, or a run folder (latest one)

From a checkpoint only its `model.safetensors` and JSON files are read, never the DCP shards (unpickling them
runs code; see `stage3_train.checkpoint`): a checkpoint folder from anywhere exports without running anything.

The folder: `config.json` + `model.safetensors`.
- Tensors: `fc.weight`, `midlayer.{hidden_norm,input_layernorm,post_attention_layernorm}.weight`,
  `midlayer.self_attn.{q,k,v,o}_proj.weight`, `midlayer.mlp.{gate,up,down}_proj.weight`, `norm.weight`,
  `lm_head.weight` in bf16, and `d2t` (int64 [Vd], target id = draft id + d2t[id]) and `t2d` (bool [V]).
  No `embed_tokens`: the engines share the target's. When the draft vocabulary is the whole target vocabulary
  d2t/t2d are left out (vLLM 0.32 has no `draft_id_to_target_id` parameter then and would reject them).
- config.json: `architectures: ["LlamaForCausalLMEagle3"]`, `model_type: "llama"`, one hidden layer, the
  draft's shape, `vocab_size` = the target's, `draft_vocab_size`, `target_hidden_size` when it differs, rope
  settings and `max_position_embeddings` copied from the target's config.json, `tie_word_embeddings: false`,
  `torch_dtype: bfloat16`. RoPE in both spellings whatever the target uses: transformers-5 `rope_parameters` and
  the legacy top-level `rope_theta` / `rope_scaling` (None for plain RoPE), because SGLang's Llama layers read
  `getattr(config, "rope_theta", 10000)` and would serve a transformers-5 export with the wrong base.
- Aux layer ids (vLLM convention: id j = the residual stream entering target layer j, HF hidden_states[j]) are
  written only when they differ from the engines' default (2, N//2, N-3): at the top level as
  `eagle_aux_hidden_state_layer_ids` (vLLM reads this first) and as `eagle_config.eagle_aux_hidden_state_layer_ids`
  minus 1 (SGLang adds 1). Both or neither: vLLM 0.32's runner falls back to eagle_config's list *without*
  adding 1 when the top-level key is missing, so the minus-1 list must never appear alone. The ids pass
  `common.target.aux_layer_ids` (ascending, no id 0, in [1, N-1]): the one rule stage 2 and training use.
- `eagle3_export.json`: what the export knows beside the weights: aux layer ids, draft vocabulary, and per engine
  the compatibility notes (`sglang_check` run on the folder's config and tensors; options vLLM serves but SGLang
  ignores, e.g. `norm_before_residual` or a number of aux layers other than three, are warnings logged at export
  time and listed there). A problem the check calls an error stops the export.

`read_export` / `load_into` also read the layouts published drafts use (SpecForge/EAGLE `midlayer.*`, vLLM
speculators `layers.0.*`, see `stage3_train.published`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from common.files import fsync_dir, fsync_file
from common.logs import get_logger, setup_logging
from common.target import aux_layer_ids, default_aux_layer_ids
from stage3_train import published, sglang_check

log = get_logger("stage3")

ARCH = "LlamaForCausalLMEagle3"
META_FILE = "eagle3_export.json"
WEIGHT_KEYS = published.WEIGHT_KEYS
VOCAB_KEYS = published.VOCAB_KEYS
# Keys copied from the target's config.json when present: positions, rope, tokens.
TARGET_KEYS = ("max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
               "bos_token_id", "eos_token_id", "pad_token_id")
# The draft's shape in config.json (names as in HF LlamaConfig).
SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
              "rms_norm_eps", "draft_vocab_size")


def export_config(shape: dict[str, Any], target_cfg: dict[str, Any], layer_ids: list[int]) -> dict[str, Any]:
    """config.json of the export folder.

    shape: SHAPE_KEYS of the draft plus `target_hidden_size`; target_cfg: the target's raw config.json dict;
    layer_ids: aux layer ids in vLLM convention.
    """
    missing = [k for k in SHAPE_KEYS if k not in shape]
    if missing:
        raise ValueError(f"draft shape lacks {missing}")
    tcfg = target_cfg.get("text_config", target_cfg)  # multimodal targets nest the text model's config
    num_layers = int(tcfg["num_hidden_layers"])
    layer_ids = aux_layer_ids(layer_ids, num_layers, "export layer_ids")
    cfg: dict[str, Any] = {"architectures": [ARCH], "model_type": "llama", "num_hidden_layers": 1,
                           **{k: shape[k] for k in SHAPE_KEYS}, "vocab_size": int(tcfg["vocab_size"]),
                           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    if shape.get("norm_before_residual"):
        cfg["norm_before_residual"] = True
    if int(shape["target_hidden_size"]) != int(shape["hidden_size"]):
        cfg["target_hidden_size"] = int(shape["target_hidden_size"])
    cfg.update({k: tcfg[k] for k in TARGET_KEYS if tcfg.get(k) is not None})
    cfg.update(rope_fields(tcfg))
    if list(layer_ids) != default_aux_layer_ids(num_layers):
        cfg["eagle_aux_hidden_state_layer_ids"] = [int(i) for i in layer_ids]
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [int(i) - 1 for i in layer_ids],
                               "use_aux_hidden_state": True}
    return cfg


def rope_fields(tcfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE in both spellings: `rope_parameters` (transformers 5) and top-level `rope_theta` + `rope_scaling`
    (transformers 4; what SGLang's Llama layers read), derived from whichever the target's config has."""
    from stage3_train.model import rope_parameters_of

    params = rope_parameters_of(tcfg)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return {"rope_parameters": params, "rope_theta": float(params["rope_theta"]),
            "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling}


def compatibility(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  num_target_layers: int | None) -> dict[str, list[dict[str, str]]]:
    """Per engine, the problems serving this folder would have. vLLM: none known (it is verified by serving, see
    tests/test_served_acceptance.py); SGLang: `sglang_check` (it cannot be installed here)."""
    problems = sglang_check.check(config, tensors, num_target_layers)
    return {"vLLM": [], "SGLang": [{"level": p.level, "field": p.field, "message": p.message} for p in problems]}


def check_engines(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  num_target_layers: int | None) -> dict[str, list[dict[str, str]]]:
    """`compatibility`, with errors raised (ValueError naming engine and field) and warnings logged."""
    notes = compatibility(config, tensors, num_target_layers)
    for engine, problems in notes.items():
        errors = [p for p in problems if p["level"] == "error"]
        if errors:
            raise ValueError("export would not serve in " + engine + ": " +
                             "; ".join(f"{p['field']}: {p['message']}" for p in errors))
        for p in problems:
            log.warning(f"export: {engine}: {p['field']}: {p['message']}")
    return notes


def export_tensors(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The model's state dict -> the export's tensors (bf16 weights, int64 d2t, bool t2d, no embed_tokens)."""
    missing = [k for k in WEIGHT_KEYS + VOCAB_KEYS if k not in state]
    if missing:
        raise ValueError(f"draft state dict lacks {missing}")
    out = {k: state[k].detach().to("cpu", torch.bfloat16).contiguous() for k in WEIGHT_KEYS}
    d2t, t2d = state["d2t"].detach().cpu().long(), state["t2d"].detach().cpu().bool()
    if len(d2t) != out["lm_head.weight"].shape[0] or len(t2d) != vocab_size:
        raise ValueError(f"d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} do not match lm_head "
                         f"{tuple(out['lm_head.weight'].shape)} and vocab {vocab_size}")
    if len(d2t) < vocab_size:
        out["d2t"], out["t2d"] = d2t.contiguous(), t2d.contiguous()
    return out


def write_export(out_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                 meta: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors (+ META_FILE when `meta` is given) into a temp folder beside
    `out_dir`, fsync (files and folder), rename into place, fsync of the parent (the rename survives a power cut)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if meta is not None:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)
    return out_dir


def export_state(state: dict[str, torch.Tensor], meta: dict[str, Any], out_dir: Path) -> Path:
    """Export a model state dict; `meta` is what the trainer stores beside checkpoints (see `run_meta`)."""
    config = export_config(shape_of(meta["shape"]), meta["target_config"], meta["layer_ids"])
    tensors = export_tensors(state, config["vocab_size"])
    tcfg = meta["target_config"].get("text_config", meta["target_config"])
    num_layers = int(tcfg["num_hidden_layers"])
    notes = check_engines(config, tensors, num_layers)
    info = {"aux_layer_ids": aux_layer_ids(meta["layer_ids"], num_layers), "num_target_layers": num_layers,
            "draft_vocab_size": config["draft_vocab_size"], "vocab_size": config["vocab_size"],
            "target": meta.get("target"), "engine_compatibility": notes,
            "engines_verified": {"vLLM": "served by the real vLLM CPU server in the slow tests",
                                 "SGLang": "checked against SGLang's loader by stage3_train/sglang_check.py "
                                           "(not served here)"}}
    return write_export(out_dir, config, tensors, info)


def export_checkpoint(ckpt: Path, out_dir: Path) -> Path:
    """`python -m stage3_train.export CKPT OUT`: CKPT is a step-N folder or a run folder (its latest). Reads the
    checkpoint's model.safetensors and meta.json only (`checkpoint.load_weights`); one without them is refused."""
    from stage3_train import checkpoint

    ckpt = Path(ckpt)
    if not (ckpt / checkpoint.MARKER).is_file():
        found = checkpoint.latest(ckpt / "checkpoints") or checkpoint.latest(ckpt)
        if found is None:
            raise ValueError(f"{ckpt} is neither a complete checkpoint nor a run folder with one")
        ckpt = found
    return export_state(checkpoint.load_weights(ckpt), checkpoint.read_meta(ckpt), out_dir)


def read_export(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an export or published EAGLE-3 folder, in this project's layout: a flat Llama config,
    every weight present under its `midlayer.*` name, no embed_tokens, and both d2t and t2d (identity when the
    draft vocabulary is the whole target vocabulary). See `stage3_train.published` for the layouts read."""
    return published.read_published(Path(folder))


def layer_ids_of(config: dict[str, Any], num_target_layers: int) -> list[int]:
    """Aux layer ids (vLLM convention) of an export config: top level, else eagle_config + 1, else default."""
    if config.get("eagle_aux_hidden_state_layer_ids"):
        return list(config["eagle_aux_hidden_state_layer_ids"])
    eagle = config.get("eagle_config") or {}
    if eagle.get("eagle_aux_hidden_state_layer_ids"):
        return [i + 1 for i in eagle["eagle_aux_hidden_state_layer_ids"]]
    return default_aux_layer_ids(num_target_layers)


def shape_of(draft_cfg: Any) -> dict[str, Any]:
    """SHAPE_KEYS + target_hidden_size of a DraftConfig (or its asdict)."""
    get = draft_cfg.get if isinstance(draft_cfg, dict) else lambda k: getattr(draft_cfg, k)
    return {k: get(k) for k in SHAPE_KEYS + ("target_hidden_size", "norm_before_residual")}


def draft_config_of(config: dict[str, Any]):
    """DraftConfig of an export's config.json (the rope and position settings are the target's, copied there)."""
    from stage3_train.model import DraftConfig, rope_parameters_of

    heads = int(config["num_attention_heads"])
    eagle = config.get("eagle_config") or {}
    ids = config.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
    return DraftConfig(
        hidden_size=int(config["hidden_size"]), num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        intermediate_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
        draft_vocab_size=int(config.get("draft_vocab_size") or config["vocab_size"]),
        target_hidden_size=int(config.get("target_hidden_size") or config["hidden_size"]),
        num_aux_layers=int(config.get("num_aux_hidden_states") or (len(ids) if ids else 3)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
        rope_parameters=rope_parameters_of(config),
        norm_before_residual=bool(config.get("norm_before_residual", False)))


@torch.no_grad()
def load_into(model: torch.nn.Module, folder: Path) -> None:
    """Load a published/exported EAGLE-3 folder's weights into `model` (an Eagle3Draft, not yet sharded).

    The shapes must agree. When the draft vocabularies differ (fine-tuning on new data gives a new d2t),
    lm_head rows are carried over for the target tokens both vocabularies hold; the others keep their init.
    The model's own d2t/t2d (the shards' vocabulary) are kept.
    """
    config, tensors = read_export(folder)
    published.check_matches(config, tensors, model, folder)  # before any copy: a refusal leaves `model` as it was
    own = model.state_dict()
    for k in WEIGHT_KEYS:
        if k != "lm_head.weight":
            own[k].copy_(tensors[k])
    old_tok = torch.arange(len(tensors["d2t"])) + tensors["d2t"]        # target id of each old draft row
    new_tok = torch.arange(len(model.d2t)) + model.d2t.cpu()
    old_row = torch.full((int(config["vocab_size"]),), -1, dtype=torch.long)
    old_row[old_tok] = torch.arange(len(old_tok))
    src = old_row[new_tok]
    keep = src >= 0
    head = own["lm_head.weight"]
    head[keep.to(head.device)] = tensors["lm_head.weight"][src[keep]].to(head.dtype).to(head.device)
    if not bool(keep.all()):
        log.info(f"load_into: {int((~keep).sum())} of {len(keep)} draft tokens are new; their lm_head rows "
                 "start fresh")


def draft_from_export(folder: Path, target_dir: Path | None = None):
    """A trainable Eagle3Draft (fp32) from an export folder; embeddings from `target_dir` when given."""
    from stage3_train.model import Eagle3Draft
    from stage3_train.target_embeddings import load_target_embeddings

    config, tensors = read_export(folder)
    model = Eagle3Draft(draft_config_of(config))
    model.set_vocab(tensors["d2t"], tensors["t2d"])
    load_into(model, folder)
    if target_dir is not None:
        load_target_embeddings(model, target_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stage3_train.export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a step-N checkpoint folder, or a run folder (its latest complete checkpoint)")
    p.add_argument("out", help="output folder (replaced atomically)")
    args = p.parse_args(argv)
    setup_logging()
    out = export_checkpoint(Path(args.ckpt), Path(args.out))
    log.info(f"exported {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
