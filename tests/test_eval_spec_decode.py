"""Offline speculative decoding: exact greedy outputs on the real SmolLM2 (chain and tree, real random draft and
oracle drafts), tree bookkeeping, and parity of the cached inference draft with the TTT training forward."""
from __future__ import annotations

import pytest
import torch

from evaluation.spec_decode import (DraftTree, Eagle3Drafter, TargetModel, TreeSpec, accept_path,
                                      speculative_generate)
from tests.fixtures.eval import OracleDrafter, random_smollm2_draft

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(HF model fp32 CPU, tokenizer, prompts as ids, greedy continuations from generate())."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts, greedy = [], []
    for text in PROMPTS:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS)
        prompts.append(ids)
        greedy.append(out[0, len(ids):].tolist())
    return model, tok, prompts, greedy


@pytest.fixture(scope="module")
def target(smollm2):
    model = smollm2[0]
    n = model.config.num_hidden_layers
    return TargetModel(model, [2, n // 2, n - 3])


def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def test_tree_mask_and_accept_path():
    tree = DraftTree([5, 6, 7, 8], [-1, -1, 0, 2])    # x0 -> {5 -> 7 -> 8, 6}
    assert tree.depths() == [1, 1, 2, 3]
    mask = tree.ancestor_mask()
    assert mask[4].tolist() == [True, True, False, True, True]   # node 8 sees x0, 5, 7 and itself
    assert mask[2].tolist() == [True, False, True, False, False]
    assert accept_path(tree, [5, 7, 0, 9, 1]) == ([0, 2], 9)     # 5 then 7 accepted, 8 rejected, bonus 9
    assert accept_path(tree, [6, 0, 4, 0, 0]) == ([1], 4)
    assert accept_path(tree, [3, 0, 0, 0, 0]) == ([], 3)
    assert DraftTree.chain([1, 2, 3]).parents == [-1, 0, 1]
    with pytest.raises(ValueError):
        DraftTree([1, 2], [1, -1])
    with pytest.raises(ValueError):
        TreeSpec(depth=3, topk=2, num_nodes=11)


@pytest.mark.parametrize("spec", [TreeSpec(3), pytest.param(TreeSpec(7), marks=pytest.mark.slow),
                                  TreeSpec(4, topk=3, num_nodes=10)], ids=lambda s: s.name)
def test_real_draft_reproduces_greedy(smollm2, target, smollm2_dir, spec):
    """A random SmolLM2-shaped EAGLE-3 draft: (almost) nothing is accepted, the output is still exactly greedy."""
    model, _, prompts, greedy = smollm2
    drafter = Eagle3Drafter(random_smollm2_draft(smollm2_dir))
    for ids, ref in list(zip(prompts, greedy))[:1]:
        res = speculative_generate(target, drafter, ids, NEW_TOKENS, spec, _eos(model))
        assert res.tokens == ref
        assert len(res.accepted) >= 1 and all(0 <= a <= spec.depth for a in res.accepted)
        assert all(d == spec.num_nodes for d in res.drafted)


@pytest.mark.parametrize("mode,spec", [("copy", TreeSpec(3)), ("alternate", TreeSpec(5, topk=2, num_nodes=10)),
                                       pytest.param("alternate", TreeSpec(3), marks=pytest.mark.slow),
                                       pytest.param("copy", TreeSpec(5, topk=2, num_nodes=10), marks=pytest.mark.slow)],
                         ids=["chain-copy", "tree-alternate", "chain-alternate", "tree-copy"])
def test_oracle_draft_reproduces_greedy_and_accepts(smollm2, target, mode, spec):
    model, _, prompts, greedy = smollm2
    for ids, ref in zip(prompts, greedy):
        drafter = OracleDrafter(ids + ref, model.config.vocab_size, mode)
        res = speculative_generate(target, drafter, ids, NEW_TOKENS, spec, _eos(model))
        assert res.tokens == ref
        if mode == "copy":   # every round but the last accepts all k guesses: k + 1 tokens per target forward
            assert res.accepted[:-1] == [spec.depth] * (len(res.accepted) - 1)
        else:
            assert res.accepted[0] == spec.depth and all(a == 1 for a in res.accepted[1:-1:2])


def test_cached_draft_matches_ttt_forward(smollm2_dir):
    """Guess j at the last position of the inference drafter == TTT step j of the training forward there, when
    both are fed the same tokens: the KV cache holds exactly the keys TTT trains against."""
    from stage3_train.attention import Segments

    torch.manual_seed(1)
    draft = random_smollm2_draft(smollm2_dir).eval()
    T, k = 12, 4
    W = draft.config.num_aux_layers * draft.config.target_hidden_size
    aux_TW = torch.randn(T, W)
    ids = torch.randint(0, draft.config.vocab_size, (T + k,))
    seg = Segments.from_bounds((0, T))
    with torch.no_grad():   # training forward: step i at t embeds ids[t+1+i], position t+i
        keys, values, hidden, ttt_logits = [], [], aux_TW, []
        for i in range(k):
            st = draft(hidden, ids[1 + i:T + 1 + i], torch.arange(T) + i, seg, (tuple(keys), tuple(values)),
                       project=(i == 0))
            keys.append(st.k)
            values.append(st.v)
            hidden = st.hidden
            ttt_logits.append(draft.compute_logits(st.normed)[-1])
        drafter = Eagle3Drafter(draft)
        drafter.extend(aux_TW, ids[1:T + 1].tolist(), start=0)
        got = [drafter.last_logits_V]
        h = drafter.last_hidden_H[None]
        for j in range(1, k):
            R = len(drafter.cache)
            h, logits = drafter.step(h, ids[T + j:T + j + 1], torch.tensor([T - 1 + j]),
                                     torch.ones(1, R + 1, dtype=torch.bool), project=False)
            got.append(logits[0])
    for j in range(k):
        torch.testing.assert_close(got[j], ttt_logits[j], rtol=1e-4, atol=1e-4)
