"""TTT: the label/mask index arithmetic on a hand-made row, and ttt_forward against a naive unrolled reference."""
import pytest
import torch
import torch.nn.functional as F

from stage3_train.attention import reference_ttt_attention
from stage3_train.model import DraftConfig, Eagle3Draft, apply_rope
from stage3_train.ttt import PackedBatch, ttt_forward, valid_mask

TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=40,
            rms_norm_eps=1e-5, max_position_embeddings=128, rope_theta=10000.0)


def _hand_batch():
    # one row, T=10: conversation 0 = tokens 0..4, conversation 1 = tokens 5..8, padding at 9
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
    return PackedBatch(
        input_ids=torch.arange(20, 30)[None],
        hidden=torch.randn(1, 10, 96),
        target_ids=torch.arange(10, 20)[None],                     # target_ids[t] = 10 + t
        loss_mask=torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool),
        position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]]),
        doc_ids=doc)


def test_valid_mask_hand_example():
    t2d = torch.ones(40, dtype=torch.bool)
    t2d[13] = False                                                # target id 13 = target_ids[3] not drafted
    got = valid_mask(_hand_batch(), 3, t2d)[:, 0].int().tolist()
    # step 0, t: label target_ids[t+1], predicted token t+2 must be an assistant token of the same conversation
    #   t=0 lm[2] ok label 11 | t=1 lm[3] ok label 12 | t=2 label 13 not in vocab | t=3,4 cross into conv 1
    #   t=5 lm[7] ok label 16 | t=6 lm[8] ok label 17 | t=7 token 9 is padding
    assert got[0] == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    # step 1: label target_ids[t+2], token t+3: t=0 (lm[3], 12) ok; t=1 label 13; t=5 (lm[8], 17) ok
    assert got[1] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    # step 2: token t+4: t=0 label 13 out of vocab; t=4 crosses; t=5 -> padding
    assert got[2] == [0] * 10


class _Recorder(Eagle3Draft):
    def forward(self, hidden, input_ids, position_ids, segments, cache=((), ()), labels=None, **kw):
        self.calls.append((input_ids.clone(), position_ids.clone(), labels.clone(), len(cache[0])))
        return super().forward(hidden, input_ids, position_ids, segments, cache, labels, **kw)


def test_step_inputs_labels_positions():
    torch.manual_seed(0)
    cfg = DraftConfig.from_target_config(TINY, draft_vocab_size=29)
    model = _Recorder(cfg)
    model.calls = []
    d2t = torch.full((29,), 10)                                    # draft 0..2 -> target 10..12
    d2t[3:] = 11                                                   # skip target 13: draft 3 -> 14, ..., 28 -> 39
    t2d = torch.zeros(40, dtype=torch.bool)
    t2d[10:] = True
    t2d[13] = False
    model.set_vocab(d2t, t2d)
    batch = _hand_batch()
    ttt_forward(model, batch, torch.ones(3), 3, checkpoint=False)
    (ids0, pos0, lab0, n0), (ids1, pos1, lab1, n1), _ = model.calls
    assert ids0[:9].tolist() == list(range(21, 30)) and ids1[:8].tolist() == list(range(22, 30))
    assert pos0.tolist() == batch.position_ids[0].tolist()
    assert pos1.tolist() == (batch.position_ids[0] + 1).tolist()  # step i at position p + i (as vLLM/SGLang serve)
    # step 0 at t=5: label target_ids[6] = 16 -> draft id 16 - 11 = 5
    assert lab0.tolist() == [1, 2, -100, -100, -100, 5, 6, -100, -100, -100]
    assert lab1.tolist() == [2, -100, -100, -100, -100, 6, -100, -100, -100, -100]
    assert (n0, n1) == (0, 1)


def _reference_loss(model, batch, weights, k):
    """Unrolled TTT with full logits, the naive attention and F.cross_entropy."""
    cfg, mid = model.config, model.midlayer
    B, T = batch.input_ids.shape
    N = B * T
    doc = (batch.doc_ids + 1000 * torch.arange(B)[:, None]).reshape(-1)
    valid = valid_mask(batch, k, model.t2d)
    to_draft = model.target_to_draft()
    h = model.fc(batch.hidden.reshape(N, -1).to(model.fc.weight.dtype))
    keys, values, total = [], [], 0.0
    for i in range(k):
        ids = torch.cat([batch.input_ids[:, 1 + i:], torch.zeros(B, 1 + i, dtype=torch.long)], 1)[:, :T].reshape(-1)
        e = model.embed_tokens(ids)
        x = torch.cat([mid.input_layernorm(e), mid.hidden_norm(h)], -1)
        a = mid.self_attn
        cos, sin = model.rotary(x, (batch.position_ids + i).reshape(-1))
        q = apply_rope(a.q_proj(x).view(N, cfg.num_attention_heads, -1), cos, sin)
        kk = apply_rope(a.k_proj(x).view(N, cfg.num_key_value_heads, -1), cos, sin)
        vv = a.v_proj(x).view(N, cfg.num_key_value_heads, -1)
        keys.append(kk)
        values.append(vv)
        o = reference_ttt_attention(q, keys, values, doc)
        r = a.o_proj(o.reshape(N, -1)) + h
        h = mid.mlp(mid.post_attention_layernorm(r)) + r
        logits = model.lm_head(model.norm(h))
        tgt = torch.cat([batch.target_ids[:, 1 + i:], torch.zeros(B, 1 + i, dtype=torch.long)], 1)[:, :T]
        labels = torch.where(valid[i], to_draft[tgt], -100).reshape(-1)
        total = total + weights[i] * F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total


@pytest.mark.parametrize("checkpoint", [False, True])
def test_ttt_forward_matches_reference(checkpoint):
    torch.manual_seed(1)
    cfg = DraftConfig.from_target_config(TINY, draft_vocab_size=40)
    model = Eagle3Draft(cfg).double()
    B, T, k = 2, 12, 4
    doc = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [-1] * 3])
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.cat([torch.arange(9), torch.zeros(3, dtype=torch.long)])])
    batch = PackedBatch(torch.randint(0, 40, (B, T)), torch.randn(B, T, 96, dtype=torch.float64),
                        torch.randint(0, 40, (B, T)), torch.rand(B, T) > 0.2, pos, doc)
    weights = torch.tensor([0.8 ** i for i in range(k)], dtype=torch.float64)
    out = ttt_forward(model, batch, weights, k, checkpoint=checkpoint)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = _reference_loss(model, batch, weights, k)
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, msg=n)
    assert model.embed_tokens.weight.grad is None
    assert out.valid.tolist() == valid_mask(batch, k, model.t2d).sum((1, 2)).tolist()
    assert out.ce_sum.shape == (k,) and (out.correct <= out.valid).all()


def test_ttt_forward_errors():
    model = Eagle3Draft(DraftConfig.from_target_config(TINY))
    with pytest.raises(ValueError):
        ttt_forward(model, _hand_batch(), torch.ones(2), 3)
    with pytest.raises(ValueError):
        PackedBatch(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, 96), *(torch.zeros(1, 4, dtype=torch.long),) * 4)
