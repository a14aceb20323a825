"""gpt-oss through stage 2's capture: packed forwards (sliding-window layers + attention sinks, MoE experts)
against HF's own forward with ``output_hidden_states=True`` on each conversation alone (eager attention, which
applies the sinks and the sliding-window mask itself)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from stage2_hidden.capture import HiddenCapture, _sink_attention_blockwise, prepare_model


def tiny_gpt_oss(dtype=torch.float32, seed=0, sliding_window=4):
    """A random-weight gpt-oss: 4 layers alternating sliding / full attention, 4 experts top-2, GQA 4/2 heads,
    sinks drawn large enough to matter."""
    torch.manual_seed(seed)
    cfg = GptOssConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                       vocab_size=300, sliding_window=sliding_window, max_position_embeddings=512,
                       layer_types=["sliding_attention", "full_attention"] * 2, attn_implementation="eager")
    ref = GptOssForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
            layer.self_attn.q_proj.weight.normal_(0.0, 0.5)   # peaked attention: the window and sinks show
            layer.self_attn.k_proj.weight.normal_(0.0, 0.5)
    model = GptOssForCausalLM(copy.deepcopy(cfg)).to(dtype)   # its own config: prepare_model switches attention
    model.load_state_dict(ref.state_dict())
    model = prepare_model(model)
    assert ref.config._attn_implementation == "eager" and model.config._attn_implementation == "stage2_packed"
    return model, ref


# bf16: HF eager takes the softmax in bf16, ours in fp32, and a top-k routing can flip on a rounding.
# On CUDA the packed path is one varlen flash call with the window and the sinks applied after it (capture.py).
@pytest.mark.parametrize("dtype,atol,agree,device", [
    (torch.float32, 1e-4, 1.0, "cpu"), (torch.bfloat16, 8e-2, 0.9, "cpu"),
    pytest.param(torch.bfloat16, 8e-2, 0.8, "cuda", marks=pytest.mark.gpu)])  # H200, 2026-12-01: 5 of 6 clear tokens
def test_packed_gpt_oss_equals_hf_output_hidden_states(dtype, atol, agree, device):
    model, ref = tiny_gpt_oss(dtype)
    model, ref = model.to(device), ref.to(device)
    assert ref.config.layer_types[0] == "sliding_attention" and ref.config.sliding_window == 4
    layer_ids = [1, 2, 3]
    cap = HiddenCapture(model, layer_ids, lm_head_chunk=7)
    seqs = [torch.randint(0, 300, (n,)) for n in (9, 23, 1, 13)]   # longer and shorter than the window
    seqs = [x.to(device) for x in seqs]
    out = cap.forward(seqs)
    assert out.hidden_TW.shape == (sum(map(len, seqs)), 3 * 64)
    s = 0
    for seq in seqs:
        with torch.no_grad():
            ho = ref(seq[None], output_hidden_states=True)
        hidden = torch.cat([ho.hidden_states[j][0] for j in layer_ids], -1)
        n = len(seq)
        torch.testing.assert_close(out.hidden_TW[s:s + n].float(), hidden.float(), atol=atol, rtol=atol)
        logits = ho.logits[0].float()
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * (1 + top2[:, 0].abs())
        same = out.target_T[s:s + n].long()[clear] == logits.argmax(-1)[clear]
        assert same.float().mean() >= agree
        s += n
    cap.close()


def test_window_and_sinks_change_the_answer():
    """The packed path must not silently ignore the window or the sinks (what plain causal sdpa would do)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 12, 8) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    sinks = torch.randn(4) * 2
    plain = _sink_attention_blockwise(q, k, v, 8 ** -0.5, None, None, 1 << 20)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True).transpose(1, 2)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)
    windowed = _sink_attention_blockwise(q, k, v, 8 ** -0.5, 3, None, 1 << 20)
    sunk = _sink_attention_blockwise(q, k, v, 8 ** -0.5, None, sinks, 1 << 20)
    assert not torch.allclose(windowed[:, 3:], plain[:, 3:]) and torch.allclose(windowed[:, :3], plain[:, :3])
    assert not torch.allclose(sunk, plain)
    # tiny blocks (several query blocks per window) give the same result
    torch.testing.assert_close(_sink_attention_blockwise(q, k, v, 8 ** -0.5, 3, sinks, 1),
                               _sink_attention_blockwise(q, k, v, 8 ** -0.5, 3, sinks, 1 << 30))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_full_attention_with_sinks_equals_the_blockwise_softmax(dtype, tol):
    """Full-attention layers run the fused causal kernel and gate its output by sigmoid(lse - sink): the same as
    the fp32 softmax over [scores, sink] (GQA 4 query heads on 2 kv heads, packed segments of uneven length)."""
    from stage2_hidden.capture import _sink_attention_fused, sink_attention

    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 4, 29, 16, dtype=dtype) * 2 for _ in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    sinks = torch.randn(4) * 2
    fused = _sink_attention_fused(q, k, v, 16 ** -0.5, sinks)
    assert fused is not None, "this torch has no fused causal kernel with log-sum-exp on CPU"
    ref = _sink_attention_blockwise(q, k, v, 16 ** -0.5, None, sinks, 1 << 20)
    torch.testing.assert_close(fused.float(), ref.float(), atol=tol, rtol=tol)
    # packed: attention never crosses a segment border, window layers keep the blockwise path
    segments = [(0, 7), (7, 8), (8, 29)]
    for window in (None, 5):
        packed = sink_attention(q, k, v, segments, 16 ** -0.5, window, sinks)
        for start, end in segments:
            alone = _sink_attention_blockwise(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                              16 ** -0.5, window, sinks, 1 << 20)
            torch.testing.assert_close(packed[:, start:end].float(), alone.float(), atol=tol, rtol=tol)
