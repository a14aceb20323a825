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
from stage3_train.model import DraftConfig, Eagle3Draft, load_target_embeddings
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
    cfg = TrainConfig(data=str(shards), out=str(tmp_path / "run"), max_tokens=64, pad_multiple=16, ttt_steps=2,
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
