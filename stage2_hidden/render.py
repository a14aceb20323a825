"""Chat rendering and loss masks: one conversation -> (input_ids, loss_mask).

``loss_mask[t] = 1`` exactly on the tokens the target produced as the assistant: the assistant's
answer (reasoning, content, tool calls) and its end-of-turn token. The assistant header
(``<|im_start|>assistant\\n``), system / user turns and tool outputs are 0.

How the assistant spans are found without ``{% generation %}`` markers (SmolLM2's ChatML, Llama-3 and
Qwen3 templates have none): render the conversation once to text, ``full``. For the k-th message, if it
is an assistant turn:

* start: ``render(messages[:k], add_generation_prompt=True)`` is the text the server saw when it
  generated turn k; when it is a prefix of ``full``, the answer starts right after it. Otherwise
  (a template that rewrites history) the text that message k-1 and the generation prompt add to it is
  searched in ``full`` from where the two texts diverge, and the span starts after it (failing that, at
  the divergence point).
* end: ``render(messages[:k+1])`` with trailing whitespace stripped ends with the end-of-turn token
  (``...<|im_end|>``, ``...<|eot_id|>``); when it is a prefix of ``full`` that is the end. Otherwise
  (Qwen3 drops the reasoning of turns before the last user query, so the prefix render shows a
  ``<think>`` block the full render has not) the answer text is searched for in ``full`` after the
  start and the span extended over the end-of-turn token that follows it.

The spans are character ranges of ``full``; the fast tokenizer's offset mapping turns them into token
masks (a token is masked in when its first character lies in a span), so nothing depends on how BPE
merges across a boundary. Texts rendered with the tokenizer's own BOS in the template (Llama-3) are
tokenised with ``add_special_tokens=False``, exactly as ``apply_chat_template(tokenize=True)`` does.

Harmony (gpt-oss): the template renders every assistant turn as one or more harmony messages
``<|start|>assistant[ to=functions.f]<|channel|>{analysis|commentary|final}<|message|>...<|end|>|<|call|>|<|return|>``
and drops reasoning by its own rules (an earlier final turn keeps no analysis; a tool-call turn keeps its analysis
only while no later final answer exists; only the last turn of a training render keeps its reasoning). The prefix
renders above rewrite history too often for the text-diff rule (a tool-call turn's analysis is shown to the
generation that follows it but dropped from the full render), so harmony spans are read off the full text itself:
the role is in each message header, and a run of consecutive assistant messages is masked from right after its
first ``<|start|>assistant`` (the generation prompt) to its last end token, the inner ``<|start|>assistant`` headers
between analysis and final included (the model writes those). System, developer, user and tool messages are 0.

Reasoning field: stage 1 stores ``reasoning_content`` (vLLM's reasoning parser output); Qwen3's template reads
``message.reasoning_content``, gpt-oss's reads ``message.thinking``. ``ChatRenderer.reasoning_key`` is detected once
from the template text and ``clean_messages`` moves the stored reasoning (``reasoning_content``, or ``reasoning`` /
``thinking`` from other sources) to that key: the one place the name is mapped. For harmony templates, string tool
call arguments (OpenAI wire format) are parsed to objects, because the template writes ``arguments|tojson`` and the
model emits the JSON object, not a quoted string.

Stage-1 token ids: when the last assistant turn carries ``prompt_token_ids`` and
``completion_token_ids`` (what vLLM actually saw and sampled) and the prompt ids equal our rendering
of everything before that turn, the row uses ``prompt_token_ids + completion_token_ids`` (mask: ours
on the prompt, 1 on the completion). Re-tokenising sampled text can split it differently from how it
was sampled; the server's ids are the truth. Any mismatch falls back to the template rendering and is
counted.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Message keys the chat templates understand; stage-1 extras (token ids, finish_reason) are dropped.
_TEMPLATE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")
# Where a message's reasoning may be stored (stage 1 writes the first); the template's own key is detected.
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# One harmony message: <|start|>{header}<|message|>{body}{end token}
_HARMONY_MESSAGE = re.compile(r"<\|start\|>(.*?)<\|message\|>.*?(<\|end\|>|<\|call\|>|<\|return\|>)", re.DOTALL)
_HARMONY_ROLE = "assistant"
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


def reasoning_key(template: str) -> str:
    """The message field a chat template reads the reasoning from: ``thinking`` (gpt-oss) or ``reasoning_content``."""
    if "reasoning_content" not in template and ("message.thinking" in template or "message['thinking']" in template):
        return "thinking"
    return "reasoning_content"


def is_harmony(template: str) -> bool:
    """gpt-oss's harmony format (``<|channel|>`` message headers)."""
    return "<|channel|>" in template and "<|start|>" in template


def clean_messages(messages: list[dict[str, Any]], reasoning_to: str = "reasoning_content",
                   json_arguments: bool = False) -> list[dict[str, Any]]:
    """Only the keys a chat template reads, and only when set (Llama-3 tests ``'tool_calls' in message``); the
    reasoning under ``reasoning_to`` (module docstring); string tool-call arguments parsed when ``json_arguments``."""
    out = []
    for m in messages:
        c = {k: m[k] for k in _TEMPLATE_KEYS if k not in _REASONING_KEYS and m.get(k) is not None}
        reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None and m.get("role") == "assistant":
            c[reasoning_to] = reasoning
        if json_arguments and c.get("tool_calls"):
            c["tool_calls"] = [_json_arguments(t) for t in c["tool_calls"]]
        out.append(c)
    return out


def _json_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call.get("function"), dict) else None
    args = (fn or call).get("arguments")
    if not isinstance(args, str):
        return call
    try:
        parsed = json.loads(args)
    except ValueError:
        return call
    if fn is not None:
        return {**call, "function": {**fn, "arguments": parsed}}
    return {**call, "arguments": parsed}


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template (see the module docstring)."""

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("stage 2 needs a fast tokenizer (offset mapping) for the loss masks")
        if not tokenizer.chat_template:
            raise ValueError("the target tokenizer has no chat template")
        self.tok = tokenizer
        self.kwargs = dict(chat_template_kwargs or {})
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
        self.reasoning_key = reasoning_key(template)   # where the template reads an assistant turn's reasoning
        self.harmony = is_harmony(template)            # gpt-oss: spans read off the harmony headers
        eos = tokenizer.eos_token
        self.end_markers = tuple(dict.fromkeys(([eos] if eos else []) + list(_END_MARKERS)))

    def clean(self, messages):
        """Stored messages -> what this template reads (``clean_messages`` with the template's reasoning key)."""
        return clean_messages(messages, self.reasoning_key, json_arguments=self.harmony)

    def text(self, messages, tools=None, add_generation_prompt=False) -> str:
        return self.tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **self.kwargs)

    def prompt_ids(self, messages, tools=None) -> list[int]:
        """Token ids of `messages` with the generation prompt: what a server sees before the next answer (the
        template's own BOS kept, none added twice). The offline evaluation prompts the target with exactly this."""
        return self.tok(self.text(self.clean(messages), tools, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]

    def spans(self, messages, tools=None) -> tuple[str, list[tuple[int, int]], int]:
        """(full text, assistant char spans, number of spans found by the fallback search)."""
        full = self.text(messages, tools)
        if self.harmony:
            return full, harmony_spans(full), 0
        spans, fallbacks = [], 0
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self.text(messages[:k], tools, add_generation_prompt=True) if k else ""
            start = len(before) if full.startswith(before) else self._search_start(full, messages, k, tools, before)
            upto = self.text(messages[: k + 1], tools).rstrip()
            if full.startswith(upto) and len(upto) > start:
                end = len(upto)
            else:
                end, fallbacks = self._search_end(full, msg, start), fallbacks + 1
            if end > start:
                spans.append((start, end))
        return full, spans, fallbacks

    def _search_start(self, full: str, messages, k: int, tools, before: str) -> int:
        """Start of assistant turn k when the prompt render is no prefix of ``full`` (history rewritten, e.g. Qwen3
        shows a tool-call turn's reasoning to the generation that follows it but drops it once a later user query
        exists): the text that message k-1 and the generation prompt add to ``before`` is searched in ``full``
        after the point where the two diverge; failing that, the divergence point itself."""
        diverge = _common_prefix(full, before)
        prev = self.text(messages[: k - 1], tools) if k > 1 else ""
        if before.startswith(prev) and len(before) > len(prev):
            piece = before[len(prev):]
            pos = full.find(piece, max(0, diverge - len(piece)))
            if pos >= 0:
                return pos + len(piece)
        return diverge

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
        clean = self.clean(messages)
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


def harmony_spans(full: str) -> list[tuple[int, int]]:
    """Char spans of what the assistant wrote in a harmony render (module docstring): each run of consecutive
    assistant messages, from after its first ``<|start|>assistant`` to its last ``<|end|>``/``<|call|>``/``<|return|>``."""
    spans: list[list[int]] = []
    for m in _HARMONY_MESSAGE.finditer(full):
        header = m.group(1)
        role = re.split(r"[\s<]", header, maxsplit=1)[0]
        if role != _HARMONY_ROLE:
            continue
        if spans and spans[-1][1] == m.start():   # the model went on writing: one span
            spans[-1][1] = m.end()
        else:
            spans.append([m.start(1) + len(_HARMONY_ROLE), m.end()])
    return [(a, b) for a, b in spans]


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
