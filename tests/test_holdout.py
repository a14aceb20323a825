"""Hidden prompts stay hidden (issue 22, point 5): a conversation whose first user turn is an evaluation prompt
(MT-bench, HumanEval, GSM8K, from the real data wheels) never reaches training data. Stage 1 (its whole run: Hydra
config, input reading, the loop against a fake OpenAI server, skipped.jsonl, the manifest) and stage 2 (its reading
and rendering with the real SmolLM2 template, ``RenderStats``) drop it as a counted skip naming the prompt, and keep
it with the switch off; a missing evaluation set fails loudly; a run made before the filter is not resumed under it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from embedded import wheel_data
from evaluation.holdout import SKIP_REASON, evaluation_prompt_of, evaluation_prompts, normalize
from evaluation.prompts import load_prompts
from stage1_sample.__main__ import check_resume, run_stage1
from tests.fixtures.fake_openai import FakeOpenAI
from tests.test_stage1_robustness import _lines, _resolved

MTBENCH = load_prompts("mtbench")[0]  # mtbench-81: "Compose an engaging travel blog post about a recent trip to ..."


def _conversation(cid: str, *user_turns: str) -> dict:
    messages = []
    for text in user_turns:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "old answer"}]
    return {"id": cid, "messages": messages}


@pytest.fixture
def mixed_input(tmp_path) -> Path:
    """Two ordinary conversations around the MT-bench prompt placed as a first user turn; a conversation that opens on
    its turn 2, re-wrapped (other whitespace); one that only asks the prompt later (its first turn is ordinary)."""
    rows = [
        _conversation("plain-0", "What is the capital of France?"),
        {"id": "leak-1", "messages": [{"role": "system", "content": "You are helpful."},
                                      *_conversation("", MTBENCH.turns[0])["messages"]]},
        _conversation("plain-2", "Write a haiku about rain.", "Now one about snow."),
        _conversation("leak-3", "\n  " + MTBENCH.turns[1].replace(" ", "\n ", 3) + "  "),
        _conversation("later-4", "Hello!", MTBENCH.turns[0]),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DROPPED = [("leak-1", f"{SKIP_REASON} ({MTBENCH.id})"), ("leak-3", f"{SKIP_REASON} ({MTBENCH.id} turn 2)")]
KEPT = ["plain-0", "plain-2", "later-4"]


# ------------------------------------------------------------------------------------------- the prompt set

def test_the_set_holds_every_evaluation_prompt_normalised():
    prompts = evaluation_prompts()
    assert MTBENCH.id == "mtbench-81"
    for prompt_id, text in [(MTBENCH.id, MTBENCH.turns[0]), (f"{MTBENCH.id} turn 2", MTBENCH.turns[1]),
                            ("HumanEval/0", load_prompts("humaneval", limit=1)[0].turns[0]),
                            ("gsm8k-0", load_prompts("gsm8k", limit=1)[0].turns[0])]:
        assert prompts[normalize(text)] == prompt_id
    assert len(prompts) > 80 * 2 + 164 + 1000  # both MT-bench turns, all of HumanEval, the whole GSM8K test set
    assert evaluation_prompts() is prompts      # read once per process
    assert normalize(" a\n\tb  c \n") == "a b c"
    # the first user turn decides, after a system message; a later turn does not
    assert evaluation_prompt_of([{"role": "system", "content": "x"}, {"role": "user", "content": MTBENCH.turns[0]}]) \
        == MTBENCH.id
    assert evaluation_prompt_of(_conversation("c", "hi", MTBENCH.turns[0])["messages"]) is None


# ------------------------------------------------------------------------------------------- stage 1

def _stage1(input_file: Path, out: Path, *overrides: str) -> tuple[dict, list[dict], list[dict]]:
    """A whole stage-1 run against the fake server: (manifest, skipped.jsonl, the requests the server got)."""
    with FakeOpenAI() as fake:
        manifest = run_stage1(_resolved(input_file, out, "sample.server.launch=false",
                                        f"sample.server.urls=[{fake.url}]", *overrides))
    return manifest, _lines(out / "skipped.jsonl"), fake.requests


def _asked(requests: list[dict]) -> set[str]:
    """Every user turn the server was asked, normalised."""
    return {normalize(m["content"]) for body in requests for m in body["messages"] if m["role"] == "user"}


def test_stage1_drops_an_mtbench_prompt_and_counts_it(mixed_input, tmp_path):
    manifest, skipped, requests = _stage1(mixed_input, tmp_path / "out")
    assert manifest["accounting"] == {"input": 5, "written": 3, "skipped": 2, "failed": 0}
    assert [(s["id"], s["reason"]) for s in skipped] == DROPPED
    assert sorted(r["id"] for r in _lines(tmp_path / "out" / "shard-00000.jsonl")) == sorted(KEPT)
    assert normalize(MTBENCH.turns[1]) not in _asked(requests)  # never even sent to the target
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["sample"]["drop_eval_prompts"] is True


def test_stage1_keeps_it_with_the_switch_off(mixed_input, tmp_path):
    manifest, skipped, requests = _stage1(mixed_input, tmp_path / "out", "sample.drop_eval_prompts=false")
    assert manifest["accounting"] == {"input": 5, "written": 5, "skipped": 0, "failed": 0} and skipped == []
    assert normalize(MTBENCH.turns[1]) in _asked(requests)


def test_a_run_made_before_the_filter_is_not_resumed_under_it(mixed_input, tmp_path):
    """Its shards may hold evaluation prompts: a stored config.yaml without the key is a run that kept them."""
    out = tmp_path / "out"
    out.mkdir()
    resolved = _resolved(mixed_input, out)
    stored = json.loads(json.dumps(resolved))
    del stored["sample"]["drop_eval_prompts"]
    (out / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(ValueError, match=r"sample\.drop_eval_prompts: False -> True"):
        check_resume(out, resolved)
    check_resume(out, _resolved(mixed_input, out, "sample.drop_eval_prompts=false"))  # the same settings: resumes


@pytest.fixture
def no_gsm8k_wheel(monkeypatch):
    """GSM8K's wheel as if not installed, the process's cached evaluation set forgotten (before and after)."""
    package, relpath, requirement = wheel_data.WHEEL_FILES["gsm8k"]
    monkeypatch.setitem(wheel_data.WHEEL_FILES, "gsm8k", ("no_such_package_gsm8k", relpath, requirement))
    evaluation_prompts.cache_clear()
    yield
    evaluation_prompts.cache_clear()


def test_a_missing_evaluation_set_fails_stage1_loudly_unless_the_filter_is_off(no_gsm8k_wheel, mixed_input, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"evaluation set 'gsm8k' .*sample\.drop_eval_prompts=false"):
        _stage1(mixed_input, tmp_path / "out")
    manifest, _, _ = _stage1(mixed_input, tmp_path / "out2", "sample.drop_eval_prompts=false")
    assert manifest["accounting"]["written"] == 5


# ------------------------------------------------------------------------------------------- stage 2

@pytest.fixture(scope="module")
def renderer(smollm2_dir):
    from transformers import AutoTokenizer

    from stage2_hidden.render import ChatRenderer

    return ChatRenderer(AutoTokenizer.from_pretrained(smollm2_dir))


def _stage2(input_file: Path, renderer, **hidden) -> tuple[list[str], object]:
    """Stage 2's reading and rendering: (ids of the rendered rows, its ``RenderStats``)."""
    from stage2_hidden.config import HiddenConfig
    from stage2_hidden.pipeline import iter_rendered
    from stage2_hidden.render import RenderStats

    stats = RenderStats()
    rows = list(iter_rendered(HiddenConfig(input=str(input_file), **hidden), renderer, 4096, stats))
    return [row.id for row in rows], stats


def test_stage2_drops_an_mtbench_prompt_and_counts_it(mixed_input, renderer):
    ids, stats = _stage2(mixed_input, renderer)
    assert ids == KEPT and (stats.input, stats.rendered) == (5, 3)
    assert stats.skipped == {f"input: {reason}": 1 for _, reason in DROPPED}


def test_stage2_keeps_it_with_the_switch_off(mixed_input, renderer):
    ids, stats = _stage2(mixed_input, renderer, drop_eval_prompts=False)
    assert len(ids) == 5 and stats.skipped == {}


def test_a_missing_evaluation_set_fails_stage2_loudly(no_gsm8k_wheel, mixed_input, renderer):
    with pytest.raises(FileNotFoundError, match=r"evaluation set 'gsm8k' .*hidden\.drop_eval_prompts=false"):
        _stage2(mixed_input, renderer)
