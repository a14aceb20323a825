"""`train.init_from` reads the EAGLE-3 layouts people publish (hand-made tiny folders in each, written with
safetensors): SpecForge/EAGLE `midlayer.*`, vLLM speculators `layers.0.*` with `transformer_layer_config`, with or
without embed_tokens and d2t/t2d, layer ids in `eagle_config` or at the top level; a shape or vocabulary that does
not match the target is refused before training, naming the mismatch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stage3_train.export import WEIGHT_KEYS, draft_from_export, load_into, read_export
from stage3_train.model import DraftConfig, Eagle3Draft
from tests.fixtures.stage3 import TINY, make_tiny_target

V, H = TINY["vocab_size"], TINY["hidden_size"]


def _draft(draft_vocab: int, seed: int, **overrides) -> Eagle3Draft:
    """A tiny draft for TINY with random weights and a random draft vocabulary."""
    torch.manual_seed(seed)
    model = Eagle3Draft(DraftConfig.from_target_config({"architectures": ["LlamaForCausalLM"], **TINY}, draft_vocab,
                                                       **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p).bfloat16().float())
    tok = torch.sort(torch.randperm(V)[:draft_vocab]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[tok] = True
    model.set_vocab(tok - torch.arange(draft_vocab), t2d)
    return model


def _llama_fields(draft_vocab: int) -> dict:
    return {"model_type": "llama", "hidden_size": H, "num_attention_heads": TINY["num_attention_heads"],
            "num_key_value_heads": TINY["num_key_value_heads"], "head_dim": TINY["head_dim"],
            "intermediate_size": TINY["intermediate_size"], "num_hidden_layers": 1, "vocab_size": V,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
            "tie_word_embeddings": False, "draft_vocab_size": draft_vocab}


def _write(folder: Path, config: dict, tensors: dict, bin_file: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if bin_file:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _tensors(model: Eagle3Draft, rename=lambda k: k, embed: bool = False, vocab=("d2t", "t2d")) -> dict:
    state = model.state_dict()
    out = {rename(k): state[k].bfloat16() for k in WEIGHT_KEYS}
    if embed:
        out[rename("embed_tokens.weight")] = state["embed_tokens.weight"].bfloat16()
    for k in vocab:
        out[k] = state[k].long() if k == "d2t" else state[k].bool()
    return out


def specforge(folder, model, **kw):
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(model.config.draft_vocab_size),
           "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 4], "use_aux_hidden_state": True}}
    return _write(folder, cfg, _tensors(model, **kw))


def speculators(folder, model, norm_before_residual=False, **kw):
    layer = _llama_fields(model.config.draft_vocab_size)
    cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
           "transformer_layer_config": {k: v for k, v in layer.items() if k != "draft_vocab_size"},
           "draft_vocab_size": model.config.draft_vocab_size, "eagle_aux_hidden_state_layer_ids": [2, 4, 5],
           "speculators_config": {"algorithm": "eagle3", "proposal_methods": [{"speculative_tokens": 3}],
                                  "verifier": {"name_or_path": "tiny"}}}
    if norm_before_residual is not None:
        cfg["norm_before_residual"] = norm_before_residual
    return _write(folder, cfg, _tensors(model, rename=lambda k: k.replace("midlayer.", "layers.0."), **kw))


def _assert_loaded(new: Eagle3Draft, old: Eagle3Draft):
    own, src = new.state_dict(), old.state_dict()
    for k in WEIGHT_KEYS:
        if k != "lm_head.weight":
            assert torch.equal(own[k], src[k]), k
    old_tok = (torch.arange(len(old.d2t)) + old.d2t).tolist()
    for j, tok in enumerate((torch.arange(len(new.d2t)) + new.d2t).tolist()):
        if tok in old_tok:
            assert torch.equal(own["lm_head.weight"][j], src["lm_head.weight"][old_tok.index(tok)])


@pytest.mark.parametrize("layout", [
    dict(write=specforge, kw={}),                                            # SpecForge: midlayer.*, d2t + t2d
    dict(write=specforge, kw={"embed": True}),                               # ... with its own embed_tokens
    dict(write=specforge, kw={"rename": lambda k: "model." + k}),            # ... under a model. prefix
    dict(write=specforge, kw={"vocab": ("d2t",)}),                           # EAGLE reference: d2t only
    dict(write=specforge, kw={"vocab": ("t2d",)}),                           # t2d only
    dict(write=speculators, kw={}),                                          # vLLM speculators: layers.0.*
    dict(write=speculators, kw={"embed": True, "vocab": ("d2t",)}),
], ids=["specforge", "specforge-embed", "model-prefix", "d2t-only", "t2d-only", "speculators",
        "speculators-embed-d2t"])
def test_published_layouts_load(tmp_path, layout):
    old, new = _draft(48, seed=0), _draft(48, seed=1)
    folder = layout["write"](tmp_path / "pub", old, **layout["kw"])
    config, tensors = read_export(folder)
    assert sorted(tensors) == sorted(WEIGHT_KEYS + ("d2t", "t2d"))          # no embed_tokens: the target's is used
    assert torch.equal(tensors["d2t"], old.d2t) and torch.equal(tensors["t2d"], old.t2d)
    load_into(new, folder)
    _assert_loaded(new, old)


def test_full_vocabulary_without_d2t_and_the_bin_file(tmp_path):
    old, new = _draft(V, seed=0), _draft(V, seed=1)
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(V)}
    folder = _write(tmp_path / "pub", cfg, _tensors(old, vocab=()), bin_file=True)  # EAGLE's pytorch_model.bin
    load_into(new, folder)
    _assert_loaded(new, old)


def test_speculators_config_round_trips_into_a_draft(tmp_path):
    old = _draft(48, seed=0)
    folder = speculators(tmp_path / "pub", old)
    back = draft_from_export(folder, make_tiny_target(tmp_path / "target"))
    assert back.config.draft_vocab_size == 48 and back.config.hidden_size == H
    assert back.config.num_aux_layers == 3 and back.config.norm_before_residual is False
    _assert_loaded(back, old)


def test_mismatches_are_refused_naming_them(tmp_path):
    old, new = _draft(48, seed=0), _draft(48, seed=1)
    before = {k: v.clone() for k, v in new.state_dict().items()}

    def refused(folder, match):
        with pytest.raises(ValueError, match=match):
            load_into(new, folder)
        for k, v in new.state_dict().items():                              # refused before any copy
            assert torch.equal(v, before[k]), k

    cfg = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(48)}
    _write(tmp_path / "vocab", {**cfg, "vocab_size": V + 4}, _tensors(old, vocab=("d2t",)))
    refused(tmp_path / "vocab", r"vocab_size 100 != the target's 96")
    four = _draft(48, seed=0, num_aux_layers=4)                                # fc for 4 aux layers
    _write(tmp_path / "fc", cfg, _tensors(four))
    refused(tmp_path / "fc", r"fc.weight has shape \(32, 128\).*\(32, 96\)")
    _write(tmp_path / "heads", {**cfg, "num_attention_heads": 2, "head_dim": 16}, _tensors(old))
    refused(tmp_path / "heads", "num_attention_heads = 2")
    _write(tmp_path / "nod2t", cfg, _tensors(old, vocab=()))
    refused(tmp_path / "nod2t", "no d2t/t2d tensors but draft_vocab_size 48 != vocab_size 96")
    _write(tmp_path / "rows", {**cfg, "draft_vocab_size": 40}, _tensors(old))
    refused(tmp_path / "rows", "lm_head.weight has 48 rows, config.json draft_vocab_size is 40")
    extra = {**_tensors(old), "layers.1.mlp.down_proj.weight": torch.zeros(H, 64)}
    _write(tmp_path / "extra", cfg, extra)
    refused(tmp_path / "extra", r"layers.1.mlp.down_proj.weight")
    bad_t2d = _tensors(old)
    bad_t2d["t2d"] = ~bad_t2d["t2d"]
    _write(tmp_path / "t2d", cfg, bad_t2d)
    refused(tmp_path / "t2d", "t2d does not match d2t")
    speculators(tmp_path / "nbr", old, norm_before_residual=None)              # speculators' default: True
    refused(tmp_path / "nbr", "norm_before_residual = True.*draft_overrides")
    _write(tmp_path / "arch", {**cfg, "architectures": ["LlamaForCausalLM"]}, _tensors(old))
    refused(tmp_path / "arch", "not EAGLE-3 Llama")


def test_init_from_refuses_before_training(tmp_path, tiny_stage3):
    from stage3_train.config import TrainConfig
    from stage3_train.train import run

    target_dir, shards = tiny_stage3
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(48), "vocab_size": V + 4}
    folder = _write(tmp_path / "pub", cfg, _tensors(_draft(48, seed=0), vocab=("d2t",)))
    train_cfg = TrainConfig(input=str(shards), output=str(tmp_path / "run"), max_tokens=64, pad_multiple=16,
                            ttt_steps=1, steps=1, eval_every=0, ckpt_every=0, param_dtype="float32",
                            init_from=str(folder))
    with pytest.raises(ValueError, match="vocab_size 100 != the target's 96"):
        run(train_cfg, {"path": str(target_dir)})
    assert not (tmp_path / "run/metrics.jsonl").exists() or not (tmp_path / "run/metrics.jsonl").read_text()
