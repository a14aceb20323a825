"""Offline evaluation: acceptance metrics on drafts whose predictions are known, prompt sets, and the whole
`run` (real SmolLM2 + an exported random draft) writing JSON + PNG."""
from __future__ import annotations

import json

import pytest
import torch

from evaluation.offline import EvalConfig, plain_args as _plain_args, acceptance_summary, evaluate_prompts as evaluate, run
from evaluation.prompts import Prompt, load_prompts, messages_for, render
from evaluation.spec_decode import SpecResult, TargetModel, TreeSpec
from tests.fixtures.eval import OracleDrafter

NEW_TOKENS = 16


def test_acceptance_summary_by_hand():
    results = [SpecResult([1] * 9, accepted=[3, 3, 1], drafted=[3, 3, 3]), SpecResult([1, 2], [0], [3])]
    s = acceptance_summary(results, depth=3)
    assert s["acceptance_length"] == pytest.approx(1 + 7 / 4)
    assert s["per_position"] == pytest.approx([3 / 4, 2 / 4, 2 / 4])
    assert s["histogram"] == [1, 1, 0, 2]
    assert (s["rounds"], s["drafted_tokens"], s["generated_tokens"], s["answers"]) == (4, 12, 11, 2)


def test_builtin_prompt_sets_and_turns(tmp_path):
    mt = load_prompts("mtbench")
    assert len(mt) == 80 and all(len(p.turns) == 2 for p in mt)
    assert len(load_prompts("mtbench", turns="first")[0].turns) == 1
    assert len(load_prompts("humaneval")) == 164
    assert len(load_prompts("wheel:gsm8k", limit=7)) == 7
    f = tmp_path / "convs.jsonl"   # any stage-1 input: the user turns, answers dropped
    f.write_text(json.dumps({"id": "a", "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello"},
                                                     {"role": "user", "content": "Bye"}]}) + "\n")
    [p] = load_prompts(str(f))
    assert (p.id, p.turns, p.system) == ("a", ["Hi", "Bye"], "Be brief.")
    assert messages_for(p, ["Hey"]) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "Bye"}]
    with pytest.raises(ValueError):
        load_prompts("mtbench", turns="second")
    with pytest.raises(ValueError):
        EvalConfig(num_speculative_tokens=[], tree_depth=0)
    with pytest.raises(ValueError):
        EvalConfig(tree_depth=3, tree_topk=2, tree_nodes=100)


@pytest.fixture(scope="module")
def smollm2_eval(smollm2_dir):
    """(TargetModel, tokenizer, prompts, {prompt[1:]: prompt + greedy} for every turn, eos ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = [Prompt("p0", ["Name two colours.", "And one more?"]), Prompt("p1", ["Count to five."])]
    refs = {}
    for p in prompts:
        answers = []
        for _ in p.turns:
            ids = render(tok, messages_for(p, answers))
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS)[0].tolist()
            refs[tuple(ids[1:])] = out
            answers.append(tok.decode([t for t in out[len(ids):] if t != 2], skip_special_tokens=True))
    n = model.config.num_hidden_layers
    return TargetModel(model, [2, n // 2, n - 3]), tok, prompts, refs, {2}


@pytest.mark.parametrize("k", [3, 5])
def test_copy_draft_accepts_everything_but_the_end(smollm2_eval, k):
    target, tok, prompts, refs, eos = smollm2_eval
    drafter = OracleDrafter(refs, target.model.config.vocab_size, "copy")
    s = evaluate(target, drafter, tok, prompts, TreeSpec(k), NEW_TOKENS, eos)
    assert s["answers"] == 3
    # every round accepts all k guesses except at most the last round of each answer (the reference ends there)
    assert s["histogram"][k] >= s["rounds"] - s["answers"]
    assert s["acceptance_length"] >= (k + 1) - k * s["answers"] / s["rounds"]
    assert s["per_position"][0] >= 1 - s["answers"] / s["rounds"]


def test_wrong_draft_accepts_nothing(smollm2_eval):
    target, tok, prompts, refs, eos = smollm2_eval
    drafter = OracleDrafter(refs, target.model.config.vocab_size, "wrong")
    s = evaluate(target, drafter, tok, prompts[1:], TreeSpec(3), NEW_TOKENS, eos)
    assert s["acceptance_length"] == 1.0 and s["per_position"] == [0.0, 0.0, 0.0]
    assert s["histogram"] == [s["rounds"], 0, 0, 0]
    assert s["rounds"] == s["generated_tokens"] - s["answers"]   # one token per target forward after the prefill


@pytest.mark.slow
def test_run_writes_json_and_png(smollm2_dir, random_smollm2_export, tmp_path):
    cfg = _plain_args(["--plain", "--target", str(smollm2_dir), "--draft", str(random_smollm2_export),
                       "--output", str(tmp_path / "eval"), "--datasets", "gsm8k", "--num-prompts", "1",
                       "--max-new-tokens", "8", "--num-speculative-tokens", "2", "--tree-depth", "2",
                       "--tree-topk", "2", "--tree-nodes", "4", "--device", "cpu"])
    report = run(cfg)
    saved = json.loads((tmp_path / "eval" / "acceptance.json").read_text())
    assert saved["complete"] is True and saved["layer_ids"] == [2, 15, 27]
    gsm = saved["results"]["gsm8k"]
    assert set(gsm) == {"num_prompts", "chain-k2", "tree-d2-top2-n4"}
    for spec, depth in (("chain-k2", 2), ("tree-d2-top2-n4", 2)):
        s = gsm[spec]
        assert 1.0 <= s["acceptance_length"] <= depth + 1 and len(s["histogram"]) == depth + 1
        assert sum(s["histogram"]) == s["rounds"] > 0
    png = tmp_path / "eval" / "acceptance.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert report["plot"] == str(png)
