"""Stage 3 export: config.json keys, safetensors keys, round trip export -> trainable draft, and (slow) the real
vLLM CPU server serving SmolLM2 with the exported draft as its EAGLE-3 speculator."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.target import default_aux_layer_ids
from stage3_train.export import (WEIGHT_KEYS, draft_from_export, export_checkpoint,
                                 export_config, export_state, layer_ids_of, read_export)
from stage3_train.model import DraftConfig, Eagle3Draft
from stage3_train.target_embeddings import load_target_embeddings
from stage3_train.train import run_meta
from tests.fixtures.stage3 import TINY, TINY_LAYERS, make_tiny_target


def _random_draft(target_cfg: dict, draft_vocab: int, seed: int = 0) -> Eagle3Draft:
    """A draft for `target_cfg` with random bf16-representable weights and a random draft vocabulary."""
    torch.manual_seed(seed)
    model = Eagle3Draft(DraftConfig.from_target_config(target_cfg, draft_vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the export stores bf16: make the round trip exact
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((1 + 0.1 * torch.randn_like(p)).to(torch.bfloat16).float())
    V = model.config.vocab_size
    tok = torch.sort(torch.randperm(V)[:draft_vocab]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[tok] = True
    model.set_vocab(tok - torch.arange(draft_vocab), t2d)
    return model


def test_config_keys_and_layer_id_conventions():
    shape = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
             "intermediate_size": 1536, "rms_norm_eps": 1e-5, "draft_vocab_size": 32000, "target_hidden_size": 576}
    target = {"vocab_size": 49152, "num_hidden_layers": 30, "max_position_embeddings": 8192,
              "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "eos_token_id": 2}
    cfg = export_config(shape, target, default_aux_layer_ids(30))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == 49152 and cfg["draft_vocab_size"] == 32000
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_parameters"] == target["rope_parameters"] and cfg["max_position_embeddings"] == 8192
    assert "target_hidden_size" not in cfg  # same as hidden_size
    assert "eagle_aux_hidden_state_layer_ids" not in cfg and "eagle_config" not in cfg  # default layers [2, 15, 27]
    custom = export_config({**shape, "target_hidden_size": 1024}, target, [1, 10, 29])
    assert custom["target_hidden_size"] == 1024
    assert custom["eagle_aux_hidden_state_layer_ids"] == [1, 10, 29]                 # vLLM reads this first
    assert custom["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 9, 28]  # SGLang adds 1
    assert layer_ids_of(custom, 30) == [1, 10, 29]
    assert layer_ids_of({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 9, 28]}}, 30) == [1, 10, 29]
    assert layer_ids_of(cfg, 30) == [2, 15, 27]


def test_round_trip_every_tensor_and_outputs(tmp_path):
    target_dir = make_tiny_target(tmp_path / "target")
    target_cfg = json.loads((target_dir / "config.json").read_text())
    model = _random_draft(target_cfg, draft_vocab=64)
    load_target_embeddings(model, target_dir)
    meta = run_meta(model.config, target_cfg, [1, 4, 7], {"name": "tiny", "path": str(target_dir)})
    out = export_state(model.state_dict(), meta, tmp_path / "export")

    tensors = load_file(str(out / "model.safetensors"))
    assert sorted(tensors) == sorted(WEIGHT_KEYS + ("d2t", "t2d"))  # no embed_tokens
    assert all(tensors[k].dtype == torch.bfloat16 for k in WEIGHT_KEYS)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    config = json.loads((out / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 4, 7] and config["vocab_size"] == TINY["vocab_size"]

    back = draft_from_export(out, target_dir)
    assert back.config == model.config
    own, other = model.state_dict(), back.state_dict()
    assert sorted(own) == sorted(other)
    for key in own:
        torch.testing.assert_close(other[key], own[key], rtol=0, atol=0, msg=key)

    from stage3_train.ttt import PackedBatch, ttt_forward

    g = torch.Generator().manual_seed(1)
    T = 24
    batch = PackedBatch(input_ids=torch.randint(0, TINY["vocab_size"], (1, T), generator=g),
                        hidden=torch.randn(1, T, 3 * TINY["hidden_size"], generator=g),
                        target_ids=torch.randint(0, TINY["vocab_size"], (1, T), generator=g),
                        loss_mask=torch.ones(1, T, dtype=torch.bool),
                        position_ids=torch.cat([torch.arange(10), torch.arange(14)])[None],
                        doc_ids=torch.cat([torch.zeros(10), torch.ones(14)]).long()[None])
    w = torch.ones(3)
    a, b = ttt_forward(model, batch, w, 3, checkpoint=False), ttt_forward(back, batch, w, 3, checkpoint=False)
    assert int(a.valid.sum()) > 0
    torch.testing.assert_close(b.ce_sum, a.ce_sum, rtol=0, atol=0)
    assert torch.equal(a.correct, b.correct)


def test_export_cli_from_a_checkpoint_and_bad_folders(tmp_path, tiny_stage3):
    from stage3_train.config import TrainConfig
    from stage3_train.export import main
    from stage3_train.train import run

    target_dir, shards = tiny_stage3
    cfg = TrainConfig(input=str(shards), output=str(tmp_path / "run"), max_tokens=64, pad_multiple=16, ttt_steps=2,
                      steps=2, log_every=1, eval_every=0, ckpt_every=0, param_dtype="float32", export=True)
    run(cfg, {"path": str(target_dir)})
    main([str(tmp_path / "run"), str(tmp_path / "cli")])  # run folder -> its latest checkpoint
    final = load_file(str(tmp_path / "run/export/model.safetensors"))
    again = load_file(str(tmp_path / "cli/model.safetensors"))
    assert sorted(final) == sorted(again)
    for key in final:
        assert torch.equal(final[key], again[key]), key
    with pytest.raises(ValueError, match="neither a complete checkpoint"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "x")
    with pytest.raises(ValueError, match="no config.json"):
        read_export(tmp_path)


def test_init_from_published_folder_remaps_lm_head(tmp_path):
    target_dir = make_tiny_target(tmp_path / "target")
    target_cfg = json.loads((target_dir / "config.json").read_text())
    old = _random_draft(target_cfg, draft_vocab=64, seed=0)
    meta = run_meta(old.config, target_cfg, TINY_LAYERS, {"name": "tiny"})
    folder = export_state(old.state_dict(), meta, tmp_path / "published")
    new = _random_draft(target_cfg, draft_vocab=64, seed=1)  # another draft vocabulary (new data)
    from stage3_train.export import load_into

    load_into(new, folder)
    torch.testing.assert_close(new.fc.weight, old.fc.weight, rtol=0, atol=0)
    old_tok = (torch.arange(64) + old.d2t).tolist()
    new_tok = (torch.arange(64) + new.d2t).tolist()
    for j, tok in enumerate(new_tok):
        if tok in old_tok:
            assert torch.equal(new.lm_head.weight[j], old.lm_head.weight[old_tok.index(tok)])


@pytest.mark.slow
def test_vllm_cpu_server_serves_the_exported_smollm2_draft(tmp_path, smollm2_dir):
    """The real vLLM CPU server loads SmolLM2 + the exported draft (random weights, SmolLM2 shapes) as EAGLE-3,
    answers a chat request, and counts drafts in /metrics."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("vllm")
    from common.server import VLLMServer, free_port, vllm_command

    target_cfg = json.loads((Path(smollm2_dir) / "config.json").read_text())
    model = _random_draft(target_cfg, draft_vocab=32000)
    meta = run_meta(model.config, target_cfg, default_aux_layer_ids(target_cfg["num_hidden_layers"]),
                    {"name": "smollm2-135m"})
    draft = export_state(model.state_dict(), meta, tmp_path / "draft")
    port = free_port()
    spec = json.dumps({"method": "eagle3", "model": str(draft), "num_speculative_tokens": 3})
    cmd = vllm_command(str(smollm2_dir), "smollm2", port, max_model_len=2048, gpu=False,
                       extra_args=["--speculative-config", spec])
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    with VLLMServer(cmd, port=port, env=env, log_file=tmp_path / "server.log", startup_timeout=900) as server:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
            "model": "smollm2", "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": "Name three colours."}]}).json()
        assert reply["choices"][0]["message"]["content"].strip(), reply
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
    drafts = [float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode_num_drafts_total")]
    assert drafts and sum(drafts) > 0, "\n".join(ln for ln in metrics.splitlines() if "spec_decode" in ln)


# ---- RoPE base, aux-id rule, engine compatibility notes, the SGLang check on a real export, the draft vocabulary ----
SHAPE = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
         "intermediate_size": 1536, "rms_norm_eps": 1e-5, "draft_vocab_size": 2048, "target_hidden_size": 576}


def test_rope_theta_and_scaling_at_top_level_whatever_the_target_format(smollm2_dir):
    v5 = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert "rope_theta" not in v5 and v5["rope_parameters"]["rope_theta"] == 100000.0  # transformers-5 only
    cfg = export_config(SHAPE, v5, default_aux_layer_ids(30))
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None  # what SGLang's Llama layers read
    assert cfg["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    scaled = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 4096}
    legacy = {k: v for k, v in v5.items() if k != "rope_parameters"}
    legacy.update(rope_theta=500000.0, rope_scaling=scaled)                       # transformers-4 spelling
    cfg = export_config(SHAPE, legacy, default_aux_layer_ids(30))
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] == scaled
    assert cfg["rope_parameters"] == {**scaled, "rope_theta": 500000.0}
    cfg = export_config(SHAPE, {**v5, "rope_parameters": {**scaled, "rope_theta": 500000.0}}, [2, 15, 27])
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] == scaled


def test_export_refuses_unsorted_ids_and_id_zero():
    target = {"vocab_size": 49152, "num_hidden_layers": 30, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="ascending"):
        export_config(SHAPE, target, [15, 2, 27])
    with pytest.raises(ValueError, match="id 0"):
        export_config(SHAPE, target, [0, 15, 27])
    with pytest.raises(ValueError, match=r"\[1, 29\]"):
        export_config(SHAPE, target, [2, 15, 30])
    cfg = export_config(SHAPE, target, [1, 10, 29])                               # ascending custom ids: as before
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 10, 29]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 9, 28]


def _export_tiny(tmp_path, name, draft_vocab=64, layer_ids=TINY_LAYERS, **overrides):
    target_dir = make_tiny_target(tmp_path / "target")
    target_cfg = json.loads((target_dir / "config.json").read_text())
    torch.manual_seed(0)
    model = Eagle3Draft(DraftConfig.from_target_config(target_cfg, draft_vocab, num_aux_layers=len(layer_ids),
                                                       **overrides))
    tok = torch.sort(torch.randperm(TINY["vocab_size"])[:draft_vocab]).values
    t2d = torch.zeros(TINY["vocab_size"], dtype=torch.bool)
    t2d[tok] = True
    model.set_vocab(tok - torch.arange(draft_vocab), t2d)
    meta = run_meta(model.config, target_cfg, list(layer_ids), {"name": "tiny"})
    return export_state(model.state_dict(), meta, tmp_path / name)


def test_options_sglang_ignores_warn_and_are_recorded(tmp_path, caplog):
    from stage3_train.export import META_FILE

    plain = _export_tiny(tmp_path, "plain")
    meta = json.loads((plain / META_FILE).read_text())
    assert meta["engine_compatibility"] == {"vLLM": [], "SGLang": []} and meta["aux_layer_ids"] == TINY_LAYERS
    with caplog.at_level("WARNING", logger="eagle3"):
        nbr = _export_tiny(tmp_path, "nbr", norm_before_residual=True)
    assert any("SGLang" in r.getMessage() and "norm_before_residual" in r.getMessage() for r in caplog.records)
    notes = json.loads((nbr / META_FILE).read_text())["engine_compatibility"]["SGLang"]
    assert [(n["level"], n["field"]) for n in notes] == [("warning", "norm_before_residual")]
    caplog.clear()
    with caplog.at_level("WARNING", logger="eagle3"):
        four = _export_tiny(tmp_path, "four", layer_ids=[1, 2, 4, 6])
    assert any("SGLang" in r.getMessage() and "three aux layers" in r.getMessage() for r in caplog.records)
    notes = json.loads((four / META_FILE).read_text())["engine_compatibility"]["SGLang"]
    assert [(n["level"], n["field"]) for n in notes] == [("warning", "fc.weight")]


def test_sglang_check_on_a_real_smollm2_export(tmp_path, smollm2_dir):
    from stage3_train import sglang_check
    from stage3_train.export import META_FILE, check_engines

    target_cfg = json.loads((Path(smollm2_dir) / "config.json").read_text())
    model = _random_draft(target_cfg, draft_vocab=2048)
    meta = run_meta(model.config, target_cfg, [1, 15, 27], {"name": "smollm2-135m"})
    out = export_state(model.state_dict(), meta, tmp_path / "export")  # export_state runs the check itself
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    assert sglang_check.check(config, tensors, 30) == []
    assert json.loads((out / META_FILE).read_text())["engine_compatibility"]["SGLang"] == []
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 14, 26]  # SGLang captures [1, 15, 27]

    def fields(cfg, ts=tensors):
        return {(p.level, p.field) for p in sglang_check.check(cfg, ts, 30)}

    assert ("error", "rope_theta") in fields({k: v for k, v in config.items() if k != "rope_theta"})
    assert ("error", "tie_word_embeddings") in fields({**config, "tie_word_embeddings": True})
    assert ("error", "eagle_config.eagle_aux_hidden_state_layer_ids") in fields(
        {**config, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 15, 27]}})   # ids not minus 1
    assert ("error", "eagle_config.eagle_aux_hidden_state_layer_ids") in fields(
        {k: v for k, v in config.items() if k != "eagle_config"})                       # SGLang: default layers
    assert ("error", "draft_vocab_size") in fields({k: v for k, v in config.items() if k != "draft_vocab_size"})
    assert ("error", "d2t") in fields(config, {k: v for k, v in tensors.items() if k != "d2t"})
    renamed = {k.replace("midlayer.", "layers.0."): v for k, v in tensors.items()}      # speculators' names
    assert ("error", "layers.0.mlp.down_proj.weight") in fields(config, renamed)
    assert ("error", "model.midlayer.mlp.down_proj.weight") in fields(config, renamed)
    with pytest.raises(ValueError, match="SGLang: rope_theta"):
        check_engines({k: v for k, v in config.items() if k != "rope_theta"}, tensors, 30)


def test_draft_vocabulary_counts_the_labels_training_uses(tmp_path):
    from stage2_hidden.vocab import count_targets, load_vocab
    from tests.fixtures.shards import write_shards

    def row(i, target, mask):
        T = len(target)
        return {"id": f"r{i}", "input_ids": torch.zeros(T, dtype=torch.int32),
                "target_ids": torch.tensor(target, dtype=torch.int32),
                "loss_mask": torch.tensor(mask, dtype=torch.uint8), "hidden": torch.zeros(T, 12).bfloat16()}

    # label target_ids[j] is trained iff loss_mask[j+1] (token j+1 is an assistant token), within its row:
    # row 0 trains on target_ids[1], [2] = 2, 3 (not 3, 4: loss_mask's own positions); row 1 on target_ids[0] = 6
    # only, its last token 7 has no next token, and row 0's last token 5 must not borrow row 1's mask.
    rows = [row(0, [1, 2, 3, 4, 5], [0, 0, 1, 1, 0]), row(1, [6, 7], [1, 1]), row(2, [1, 1, 2], [0, 1, 1])]
    fields = {"layer_ids": [1, 2, 3], "hidden_size": 4, "vocab_size": 8}
    manifest = write_shards(tmp_path, rows, fields, rows_per_shard=8, draft_vocab_size=3)
    counts = count_targets(sorted(tmp_path.glob("shard-*.arrow")), 8)
    assert counts.tolist() == [0, 2, 1, 1, 0, 0, 1, 0]          # 1 (row 2: twice), 2, 3, 6
    d2t, t2d = load_vocab(tmp_path)
    assert (torch.arange(3) + d2t).tolist() == [1, 2, 3]          # top 3 by count, ties by smaller id
    assert manifest["coverage"] == pytest.approx(4 / 5)
