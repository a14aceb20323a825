"""Packed capture against independent HF forwards (output_hidden_states + full logits)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.target import default_aux_layer_ids as default_layer_ids
from stage2_hidden.capture import HiddenCapture, pack_groups, prepare_model


def tiny_llama(dtype=torch.float32, seed=0):
    """A random-weight Llama with 4 layers (GQA, like SmolLM2's 9/3 heads ratio)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=500, max_position_embeddings=1024)
    ref = LlamaForCausalLM(cfg).to(dtype).eval()
    model = LlamaForCausalLM(cfg).to(dtype)
    model.load_state_dict(ref.state_dict())
    return prepare_model(model), ref


def reference(ref, seq, layer_ids):
    with torch.no_grad():
        out = ref(seq[None], output_hidden_states=True)
    return torch.cat([out.hidden_states[j][0] for j in layer_ids], -1), out.logits[0]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_equals_unpacked_hf(dtype, atol):
    model, ref = tiny_llama(dtype)
    layer_ids = [0, 2, 3]
    cap = HiddenCapture(model, layer_ids, lm_head_chunk=5)   # chunks that do not divide T
    seqs = [torch.randint(0, 500, (n,)) for n in (7, 31, 1, 18)]
    out = cap.forward(seqs)
    assert out.hidden_TW.shape == (sum(map(len, seqs)), 3 * 96) and out.target_T.dtype == torch.int32
    s = 0
    for seq in seqs:
        hidden, logits = reference(ref, seq, layer_ids)
        n = len(seq)
        torch.testing.assert_close(out.hidden_TW[s:s + n].float(), hidden.float(), atol=atol, rtol=atol)
        top2 = logits.float().topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * (1 + top2[:, 0].abs())   # ignore exact near-ties
        assert torch.equal(out.target_T[s:s + n].long()[clear], logits.argmax(-1)[clear])
        assert clear.float().mean() > 0.8
        s += n


def test_hooks_removed_and_layer_ids_checked():
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="layer_ids"):
        HiddenCapture(model, [1, 4], lm_head_chunk=8)
    with pytest.raises(ValueError, match="layer_ids"):
        HiddenCapture(model, [1, 1], lm_head_chunk=8)
    cap = HiddenCapture(model, [1], lm_head_chunk=8)
    cap.close()
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)


def test_default_layer_ids():
    assert default_layer_ids(32) == [2, 16, 29]
    assert default_layer_ids(30) == [2, 15, 27]


def test_pack_groups():
    assert pack_groups([3, 4, 2, 9, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert pack_groups([], 8) == []
