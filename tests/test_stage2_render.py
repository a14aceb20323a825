"""Loss masks against hand-checked assistant spans on real chat templates.

SmolLM2's ChatML template is the real one of the embedded model. The Llama-3 and Qwen3 templates in
tests/assets/ are verbatim copies of the official ones (from llama.cpp's models/templates:
``meta-llama-Llama-3.3-70B-Instruct.jinja``, identical to Llama-3.1's, and ``Qwen-Qwen3-0.6B.jinja``),
set on SmolLM2's tokenizer together with the special tokens they use, so everything builds offline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stage2_hidden.render import ChatRenderer, Rendered, RenderStats, fit_length

ASSETS = Path(__file__).parent / "assets"
CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "That is 6."},
]


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _tok_with_template(smollm2_dir, template: str, specials: list[str], bos: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.add_special_tokens({"additional_special_tokens": specials})
    if bos:
        tok.bos_token = bos
    tok.chat_template = (ASSETS / template).read_text()
    return tok


def mask_runs(row: Rendered) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of mask == 1."""
    out, start = [], None
    for i, m in enumerate(list(row.loss_mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def masked_spans(tok, row: Rendered) -> list[str]:
    """Decoded text of each maximal run of mask == 1."""
    return [tok.decode(row.input_ids[a:b].tolist()) for a, b in mask_runs(row)]


def test_chatml_smollm2(smol_tok):
    row = ChatRenderer(smol_tok).render("a", CHAT)
    assert masked_spans(smol_tok, row) == ["2+2 is 4.<|im_end|>", "That is 6.<|im_end|>"]
    # the ids are exactly what apply_chat_template tokenises
    assert row.input_ids.tolist() == smol_tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert row.input_ids.dtype == np.int32 and row.loss_mask.dtype == np.uint8


def test_llama3_template(smollm2_dir):
    tok = _tok_with_template(smollm2_dir, "llama3_chat_template.jinja",
                             ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                              "<|eom_id|>", "<|python_tag|>"], bos="<|begin_of_text|>")
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = "  2+2 is 4.\n"  # the template trims content
    row = ChatRenderer(tok).render("a", chat)
    assert masked_spans(tok, row) == ["2+2 is 4.<|eot_id|>", "That is 6.<|eot_id|>"]
    assert tok.decode(row.input_ids[:1].tolist()) == "<|begin_of_text|>"  # BOS once, from the template


QWEN_SPECIALS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def test_qwen3_thinking_history(smollm2_dir):
    """Qwen3 drops the reasoning of turns before the last user query: the span follows the full render."""
    tok = _tok_with_template(smollm2_dir, "qwen3_chat_template.jinja", QWEN_SPECIALS)
    chat = [dict(m) for m in CHAT]
    chat[2]["reasoning_content"] = "add two"
    chat[4]["reasoning_content"] = "add three"
    stats = RenderStats()
    row = ChatRenderer(tok, {"enable_thinking": True}).render("a", chat, stats=stats)
    assert masked_spans(tok, row) == ["2+2 is 4.<|im_end|>",
                                      "<think>\nadd three\n</think>\n\nThat is 6.<|im_end|>"]
    assert stats.span_fallback == 1  # the first turn's prefix render shows its <think>, the full one not


def test_qwen3_no_thinking(smollm2_dir):
    """enable_thinking=false: the empty think block belongs to the generation prompt, not the answer."""
    tok = _tok_with_template(smollm2_dir, "qwen3_chat_template.jinja", QWEN_SPECIALS)
    row = ChatRenderer(tok, {"enable_thinking": False}).render("a", CHAT[:3])
    assert masked_spans(tok, row) == ["2+2 is 4.<|im_end|>"]
    assert "<think>\n\n</think>\n\n" in tok.decode(row.input_ids.tolist())


def test_qwen3_tool_calls(smollm2_dir):
    """Tool calls are the assistant's (masked in); tool outputs are not."""
    tok = _tok_with_template(smollm2_dir, "qwen3_chat_template.jinja", QWEN_SPECIALS)
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21C"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    row = ChatRenderer(tok, {"enable_thinking": True}).render("t", chat, tools=tools)
    spans = masked_spans(tok, row)
    assert spans == ['<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                     "<think>\n\n</think>\n\nIt is sunny.<|im_end|>"]
    assert "sunny, 21C" in tok.decode(row.input_ids.tolist()) and not any("21C" in s for s in spans)


def test_server_ids_used_when_consistent(smol_tok):
    renderer = ChatRenderer(smol_tok)
    prompt = smol_tok.apply_chat_template(CHAT[:4], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
    # the server sampled "That is 6." character by character: ids re-tokenisation would never produce
    completion = [smol_tok.convert_tokens_to_ids(c) for c in "That"] + [smol_tok.eos_token_id]
    chat = [dict(m) for m in CHAT]
    chat[4].update(content="That", prompt_token_ids=prompt, completion_token_ids=completion)
    stats = RenderStats()
    row = renderer.render("s", chat, stats=stats)
    assert row.source == "server_ids" and stats.server_ids == 1
    assert row.input_ids.tolist() == prompt + completion
    assert row.loss_mask[len(prompt):].all()
    assert masked_spans(smol_tok, row)[0] == "2+2 is 4.<|im_end|>"  # earlier turn from the template mask

    chat[4]["prompt_token_ids"] = prompt[:-1]  # inconsistent: fall back to the template, counted
    row = renderer.render("s", chat, stats=stats)
    assert row.source == "template" and stats.server_ids_mismatch == 1


def test_fit_length():
    row = Rendered("x", np.arange(10, dtype=np.int32), np.array([0] * 5 + [1] * 5, np.uint8), "template")
    stats = RenderStats()
    cut = fit_length(row, 7, "truncate", stats)
    assert len(cut.input_ids) == 7 and cut.truncated and stats.truncated == 1
    assert fit_length(row, 7, "skip", stats) is None and stats.skipped == {"too_long": 1}
    assert fit_length(row, 4, "truncate", stats) is None  # no assistant token left
    assert stats.skipped["no_assistant_tokens"] == 1
