"""Chat rendering and loss masks: one conversation -> (input_ids, loss_mask).

``loss_mask[t] = 1`` exactly on the tokens the target produced as the assistant: the assistant's
answer (reasoning, content, tool calls) and its end-of-turn token. The assistant header
(``<|im_start|>assistant\\n``), system / user turns and tool outputs are 0.

How the assistant spans are found without ``{% generation %}`` markers (SmolLM2's ChatML, Llama-3 and
Qwen3 templates have none): render the conversation once to text, ``full``. For the k-th message, if it
is an assistant turn:

* start: ``render(messages[:k], add_generation_prompt=True)`` is the text the server saw when it
  generated turn k; when it is a prefix of ``full``, the answer starts right after it. Otherwise
  (a template that rewrites history) the span starts where the two texts diverge.
* end: ``render(messages[:k+1])`` with trailing whitespace stripped ends with the end-of-turn token
  (``...<|im_end|>``, ``...<|eot_id|>``); when it is a prefix of ``full`` that is the end. Otherwise
  (Qwen3 drops the reasoning of turns before the last user query, so the prefix render shows a
  ``<think>`` block the full render has not) the answer text is searched for in ``full`` after the
  start and the span extended over the end-of-turn token that follows it.

The spans are character ranges of ``full``; the fast tokenizer's offset mapping turns them into token
masks (a token is masked in when its first character lies in a span), so nothing depends on how BPE
merges across a boundary. Texts rendered with the tokenizer's own BOS in the template (Llama-3) are
tokenised with ``add_special_tokens=False``, exactly as ``apply_chat_template(tokenize=True)`` does.

Stage-1 token ids: when the last assistant turn carries ``prompt_token_ids`` and
``completion_token_ids`` (what vLLM actually saw and sampled) and the prompt ids equal our rendering
of everything before that turn, the row uses ``prompt_token_ids + completion_token_ids`` (mask: ours
on the prompt, 1 on the completion). Re-tokenising sampled text can split it differently from how it
was sampled; the server's ids are the truth. Any mismatch falls back to the template rendering and is
counted.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Message keys the chat templates understand; stage-1 extras (token ids, finish_reason) are dropped.
_TEMPLATE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")
# End-of-turn markers an assistant span is extended over in the fallback search (plus the tokenizer's eos).
_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|return|>", "<|call|>", "</s>",
                "<|endoftext|>")


@dataclass
class Rendered:
    """One conversation ready for the forward pass."""
    id: str
    input_ids: np.ndarray   # int32 [T]
    loss_mask: np.ndarray   # uint8 [T]
    source: str             # "server_ids" | "template"
    truncated: bool = False


@dataclass
class RenderStats:
    """Counts printed at the end of a run and stored in the manifest."""
    input: int = 0
    rendered: int = 0
    server_ids: int = 0           # rows built from stage 1's token ids
    server_ids_mismatch: int = 0  # ids present but inconsistent with the template: re-tokenised
    span_fallback: int = 0        # assistant spans found by text search (template rewrote history)
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def template_hash(tokenizer) -> str:
    """sha256 of the chat template text (recorded in the manifest)."""
    tmpl = tokenizer.chat_template or ""
    if isinstance(tmpl, dict):
        tmpl = "\n".join(f"{k}:{v}" for k, v in sorted(tmpl.items()))
    return hashlib.sha256(tmpl.encode()).hexdigest()


def clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only the keys a chat template reads, and only when set (Llama-3 tests ``'tool_calls' in message``)."""
    return [{k: m[k] for k in _TEMPLATE_KEYS if m.get(k) is not None} for m in messages]


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template (see the module docstring)."""

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("stage 2 needs a fast tokenizer (offset mapping) for the loss masks")
        if not tokenizer.chat_template:
            raise ValueError("the target tokenizer has no chat template")
        self.tok = tokenizer
        self.kwargs = dict(chat_template_kwargs or {})
        eos = tokenizer.eos_token
        self.end_markers = tuple(dict.fromkeys(([eos] if eos else []) + list(_END_MARKERS)))

    def text(self, messages, tools=None, add_generation_prompt=False) -> str:
        return self.tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **self.kwargs)

    def prompt_ids(self, messages, tools=None) -> list[int]:
        """Token ids of `messages` with the generation prompt: what a server sees before the next answer (the
        template's own BOS kept, none added twice). The offline evaluation prompts the target with exactly this."""
        return self.tok(self.text(clean_messages(messages), tools, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]

    def spans(self, messages, tools=None) -> tuple[str, list[tuple[int, int]], int]:
        """(full text, assistant char spans, number of spans found by the fallback search)."""
        full = self.text(messages, tools)
        spans, fallbacks = [], 0
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self.text(messages[:k], tools, add_generation_prompt=True) if k else ""
            start = len(before) if full.startswith(before) else _common_prefix(full, before)
            upto = self.text(messages[: k + 1], tools).rstrip()
            if full.startswith(upto) and len(upto) > start:
                end = len(upto)
            else:
                end, fallbacks = self._search_end(full, msg, start), fallbacks + 1
            if end > start:
                spans.append((start, end))
        return full, spans, fallbacks

    def _search_end(self, full: str, msg: dict, start: int) -> int:
        """End of an assistant answer found by searching its text in ``full`` from ``start``."""
        text = (msg.get("content") or "").strip()
        pos = full.find(text, start) if text else -1
        if pos < 0:  # nothing to anchor on: up to the next end-of-turn marker
            ends = [full.find(m, start) for m in self.end_markers]
            ends = [e for e in ends if e >= 0]
            if not ends:
                return len(full)
            pos, text = min(ends), ""
        end = pos + len(text)
        for marker in self.end_markers:
            if full.startswith(marker, end):
                return end + len(marker)
        return end

    def tokenize(self, full: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of ``full`` and the mask of tokens whose first character is in a span."""
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            mask[(starts >= a) & (starts < b)] = 1
        return ids, mask

    def render(self, conv_id: str, messages: list[dict], tools=None, stats: RenderStats | None = None) -> Rendered:
        """Template rendering, or stage 1's token ids when they agree with it (module docstring)."""
        stats = stats if stats is not None else RenderStats()
        clean = clean_messages(messages)
        full, spans, fallbacks = self.spans(clean, tools)
        stats.span_fallback += fallbacks
        ids, mask = self.tokenize(full, spans)
        last = _last_assistant(messages)
        if last is not None and messages[last].get("completion_token_ids"):
            prompt = messages[last].get("prompt_token_ids") or []
            completion = messages[last]["completion_token_ids"]
            prefix = self.prompt_ids(clean[:last], tools)
            if list(prompt) == list(prefix) and list(ids[: len(prefix)]) == list(prefix):
                ids = np.asarray(list(prompt) + list(completion), dtype=np.int32)
                mask = np.concatenate([mask[: len(prompt)], np.ones(len(completion), np.uint8)])
                stats.server_ids += 1
                return Rendered(conv_id, ids, mask, "server_ids")
            stats.server_ids_mismatch += 1
        return Rendered(conv_id, ids, mask, "template")


def _last_assistant(messages) -> int | None:
    idx = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return idx[-1] if idx else None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def fit_length(row: Rendered, max_length: int, on_too_long: str, stats: RenderStats) -> Rendered | None:
    """Truncate or skip a row longer than ``max_length``; skip a row with no assistant token."""
    if len(row.input_ids) > max_length:
        if on_too_long == "skip":
            stats.skip("too_long")
            return None
        row = Rendered(row.id, row.input_ids[:max_length], row.loss_mask[:max_length], row.source, True)
        stats.truncated += 1
    if not row.loss_mask.any():
        stats.skip("no_assistant_tokens")
        return None
    return row
