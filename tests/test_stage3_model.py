"""The draft model: config from target configs, export names, embedding loading, and the layer maths."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stage3_train.attention import Segments
from stage3_train.model import DraftConfig, Eagle3Draft, rope_parameters_of
from stage3_train.target_embeddings import load_target_embeddings

LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0,
              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=40,
            rms_norm_eps=1e-5, max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=True)


def test_config_from_llama31():
    cfg = DraftConfig.from_target_config(LLAMA31_8B, draft_vocab_size=32000)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4096, 32, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.draft_vocab_size) == (14336, 128256, 32000)
    assert cfg.target_hidden_size == 4096 and cfg.num_aux_layers == 3 and cfg.max_position_embeddings == 131072
    assert cfg.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}
    # transformers-5 style and multimodal nesting
    v5 = {"text_config": {**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "head_dim": 16}}
    cfg5 = DraftConfig.from_target_config(v5)
    assert cfg5.rope_parameters == {"rope_type": "default", "rope_theta": 1e6} and cfg5.head_dim == 16
    assert cfg5.draft_vocab_size == 40
    assert rope_parameters_of({"rope_theta": 10.0})["rope_type"] == "default"
    with pytest.raises(ValueError):
        DraftConfig.from_target_config({"hidden_size": 8})
    with pytest.raises(ValueError):
        DraftConfig.from_target_config(TINY, draft_vocab_size=41)
    with pytest.raises(ValueError):
        DraftConfig.from_target_config(TINY, no_such_field=1)


def test_parameter_names_match_export():
    model = Eagle3Draft(DraftConfig.from_target_config(TINY, draft_vocab_size=30))
    names = set(model.state_dict())
    expected = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "embed_tokens.weight",
                "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
                "midlayer.post_attention_layernorm.weight"}
    expected |= {f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"}
    expected |= {f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expected
    sd = model.state_dict()
    assert sd["fc.weight"].shape == (32, 96) and sd["midlayer.self_attn.q_proj.weight"].shape == (32, 64)
    assert sd["midlayer.self_attn.k_proj.weight"].shape == (16, 64) and sd["lm_head.weight"].shape == (30, 32)
    assert sd["d2t"].dtype == torch.long and sd["t2d"].dtype == torch.bool and sd["t2d"].sum() == 30
    assert not model.embed_tokens.weight.requires_grad


def test_load_target_embeddings(tmp_path):
    cfg = DraftConfig.from_target_config(TINY)
    emb = torch.randn(40, 32)
    # sharded checkpoint: the embedding lives in the second shard
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(4, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"model.embed_tokens.weight": emb}, str(tmp_path / "b.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.layers.0.mlp.up_proj.weight": "a.safetensors", "model.embed_tokens.weight": "b.safetensors"}}))
    model = Eagle3Draft(cfg)
    load_target_embeddings(model, tmp_path)
    torch.testing.assert_close(model.embed_tokens.weight, emb)
    # tied target storing only lm_head
    tied = tmp_path / "tied"
    tied.mkdir()
    save_file({"lm_head.weight": emb * 2}, str(tied / "model.safetensors"))
    (tied / "config.json").write_text(json.dumps(TINY))
    load_target_embeddings(model, tied)
    torch.testing.assert_close(model.embed_tokens.weight, emb * 2)
    (tied / "config.json").write_text(json.dumps({**TINY, "tie_word_embeddings": False}))
    with pytest.raises(ValueError):
        load_target_embeddings(model, tied)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(41, 32)}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError):
        load_target_embeddings(model, bad)


def test_set_vocab_checks():
    model = Eagle3Draft(DraftConfig.from_target_config(TINY, draft_vocab_size=3))
    t2d = torch.zeros(40, dtype=torch.bool)
    t2d[[5, 7, 9]] = True
    model.set_vocab(torch.tensor([5, 6, 7]), t2d)
    assert model.target_to_draft()[[5, 7, 9, 6]].tolist() == [0, 1, 2, -1]
    with pytest.raises(ValueError):
        model.set_vocab(torch.tensor([5, 6, 8]), t2d)


def test_step_matches_vllm_layer_maths():
    """Step 0 on one conversation = vLLM's Eagle3 layer written out with SDPA and HF's RoPE."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(0)
    cfg = DraftConfig.from_target_config(TINY)
    model = Eagle3Draft(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    N = 9
    target = torch.randn(N, 96)
    ids = torch.randint(0, 40, (N,))
    pos = torch.arange(N) + 3
    step = model(target, ids, pos, Segments.from_bounds([0, N]), project=True)
    m, a = model.midlayer, model.midlayer.self_attn

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    g = target @ model.fc.weight.t()
    x = torch.cat([rms(model.embed_tokens(ids), m.input_layernorm.weight), rms(g, m.hidden_norm.weight)], -1)
    q = (x @ a.q_proj.weight.t()).view(1, N, 4, 8).transpose(1, 2)
    k = (x @ a.k_proj.weight.t()).view(1, N, 2, 8).transpose(1, 2)
    v = (x @ a.v_proj.weight.t()).view(1, N, 2, 8).transpose(1, 2)
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, rope_theta=10000.0))
    cos, sin = rope(x, pos[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    r = o.transpose(1, 2).reshape(N, 32) @ a.o_proj.weight.t() + g
    hn = rms(r, m.post_attention_layernorm.weight)
    h = (F.silu(hn @ m.mlp.gate_proj.weight.t()) * (hn @ m.mlp.up_proj.weight.t())) @ m.mlp.down_proj.weight.t() + r
    torch.testing.assert_close(step.hidden, h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step.normed, rms(h, model.norm.weight), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step.k.transpose(0, 1)[None], k, rtol=1e-4, atol=1e-5)


def test_mlp_token_chunks_same_result(monkeypatch):
    import stage3_train.model as model_mod

    cfg = DraftConfig.from_target_config(TINY)
    mlp = model_mod.MLP(cfg).double()
    x = torch.randn(10, 32, dtype=torch.float64, requires_grad=True)
    y_full = mlp(x)
    g_full = torch.autograd.grad(y_full.square().sum(), x)[0]
    monkeypatch.setattr(model_mod, "MLP_CHUNK_TOKENS", 4)  # 3 checkpointed chunks
    y = mlp(x)
    g = torch.autograd.grad(y.square().sum(), x)[0]
    torch.testing.assert_close(y, y_full)
    torch.testing.assert_close(g, g_full)


def _perturbed_draft(target_cfg, seed=0):
    torch.manual_seed(seed)
    model = Eagle3Draft(DraftConfig.from_target_config(target_cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_partial_rotary_factor_config():
    """v4 top-level partial_rotary_factor (as the export writes it) or v5 inside rope_parameters: same DraftConfig."""
    v4 = DraftConfig.from_target_config({**TINY, "partial_rotary_factor": 0.5})
    v5 = DraftConfig.from_target_config({**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                     "partial_rotary_factor": 0.5}})
    assert v4.rope_parameters == v5.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5}
    assert (v4.rotary_dim, v4.head_dim) == (4, 8) and DraftConfig.from_target_config(TINY).rotary_dim == 8
    with pytest.raises(ValueError):
        DraftConfig.from_target_config({**TINY, "partial_rotary_factor": 0.375})  # 3 dims: odd


def test_partial_rotary_matches_hf_reference():
    """partial_rotary_factor=0.5: RoPE on the first half of each head only, the rest passed through, both in the
    training step and in a decoding step over a KV cache = the layer written out with HF's apply_rotary_pos_emb on
    the rotated part (as HF's partial-rotary models and vLLM's rotary_dim do)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _perturbed_draft({**TINY, "partial_rotary_factor": 0.5})
    m, a, N, r = model.midlayer, model.midlayer.self_attn, 7, 4
    target, ids, pos = torch.randn(N, 96), torch.randint(0, 40, (N,)), torch.arange(N) + 5
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    with torch.no_grad():
        step = model(target, ids, pos, Segments.from_bounds([0, N]), project=True)
        dec = model(target, ids, pos, None, project=True, kv_cache=model.new_kv_cache(capacity=2), attn_mask=causal)
        g = model.fc(target)
        x = torch.cat([m.input_layernorm(model.embed_tokens(ids)), m.hidden_norm(g)], -1)
        q = a.q_proj(x).view(1, N, 4, 8).transpose(1, 2)
        k = a.k_proj(x).view(1, N, 2, 8).transpose(1, 2)
        v = a.v_proj(x).view(1, N, 2, 8).transpose(1, 2)
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, r, 2).float() / r)   # frequencies over the rotated dims only
        freqs = torch.cat([pos[None, :, None].float() * inv_freq] * 2, -1)
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], freqs.cos(), freqs.sin())
        q, k = torch.cat([q_rot, q[..., r:]], -1), torch.cat([k_rot, k[..., r:]], -1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        res = a.o_proj(o.transpose(1, 2).reshape(N, 32)) + g
        h = m.mlp(m.post_attention_layernorm(res)) + res
    torch.testing.assert_close(step.k.transpose(0, 1)[None], k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.hidden, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec.k, step.k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dec.hidden, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec.normed, step.normed, rtol=1e-5, atol=1e-5)


def test_decode_with_kv_cache_equals_training_step():
    """The decoding path (KV cache + mask) is the training forward: prefill in two appends with a causal mask =
    TTT step 0; a truncated-and-replaced row equals what a fresh cache computes for it."""
    model = _perturbed_draft(TINY, seed=3)
    N = 9
    target, ids, pos = torch.randn(N, 96), torch.randint(0, 40, (N,)), torch.arange(N)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    with torch.no_grad():
        step = model(target, ids, pos, Segments.from_bounds([0, N]), project=True)
        kv = model.new_kv_cache(capacity=1)          # grows on the way
        a = model(target[:5], ids[:5], pos[:5], None, project=True, kv_cache=kv, attn_mask=causal[:5, :5])
        model(target[5:7], ids[5:7], pos[5:7], None, project=True, kv_cache=kv, attn_mask=causal[5:7, :7])
        kv.truncate(5)                              # drop rows 5, 6 and redo them with the rest
        b = model(target[5:], ids[5:], pos[5:], None, project=True, kv_cache=kv, attn_mask=causal[5:])
        with pytest.raises(ValueError):
            model(target[:1], ids[:1], pos[:1], None, project=True, kv_cache=kv, attn_mask=causal[:1, :1])
    assert len(kv) == N
    torch.testing.assert_close(torch.cat([a.hidden, b.hidden]), step.hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kv.read()[0], step.k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kv.read()[1], step.v, rtol=1e-5, atol=1e-6)


def test_kv_cache_append_truncate_read():
    from stage3_train.kv_cache import KVCache

    kv = KVCache(2, 3, capacity=2)
    rows = torch.arange(5 * 6, dtype=torch.float32).view(5, 2, 3)
    kv.append(rows[:3], -rows[:3])            # past the capacity: grows, keeps nothing lost
    kv.truncate(1)
    kv.append(rows[3:], -rows[3:])
    k, v = kv.read()
    assert len(kv) == 3 and torch.equal(k, rows[[0, 3, 4]]) and torch.equal(v, -rows[[0, 3, 4]])
    with pytest.raises(ValueError):
        kv.truncate(4)
