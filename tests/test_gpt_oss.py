"""gpt-oss (harmony) rendering and loss masks on the REAL chat template, and reasoning through stage 1 -> stage 2.

tests/assets/gpt_oss_chat_template.jinja is a verbatim copy of openai/gpt-oss-120b's chat template (identical to
gpt-oss-20b's) as vendored by llama.cpp (``models/templates/openai-gpt-oss-120b.jinja``, added in
ggml-org/llama.cpp#15181 "gpt-oss: implement harmony parsing"; sha256 a4c9919c...8146, see
tests/assets/gpt_oss_chat_template.SOURCE.md). It is set on SmolLM2's tokenizer together with gpt-oss's special
tokens, so everything builds offline. The rendered system message carries today's date (``strftime_now``): no
assertion depends on it.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stage2_hidden.render import ChatRenderer, RenderStats, clean_messages, harmony_spans, reasoning_key
from tests.fixtures.http_server import serve_json
from tests.test_stage2_render import mask_runs

ASSETS = Path(__file__).parent / "assets"
HARMONY_SPECIALS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>",
                    "<|startoftext|>", "<|endoftext|>"]
QWEN_SPECIALS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Get the weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}


def _tok(smollm2_dir, template: str, specials: list[str], harmony: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.add_special_tokens({"additional_special_tokens": specials})
    if harmony:  # gpt-oss's own: bos <|startoftext|>, eos <|return|>, pad <|endoftext|>
        tok.bos_token, tok.eos_token, tok.pad_token = "<|startoftext|>", "<|return|>", "<|endoftext|>"
    tok.chat_template = (ASSETS / template).read_text()
    return tok


@pytest.fixture(scope="module")
def oss_tok(smollm2_dir):
    return _tok(smollm2_dir, "gpt_oss_chat_template.jinja", HARMONY_SPECIALS, harmony=True)


@pytest.fixture(scope="module")
def qwen_tok(smollm2_dir):
    return _tok(smollm2_dir, "qwen3_chat_template.jinja", QWEN_SPECIALS)


def runs(tok, row) -> list[tuple[str, str]]:
    """(the 3 tokens before, decoded text) of each maximal run of mask == 1."""
    return [(tok.decode(row.input_ids[max(0, a - 3):a].tolist()), tok.decode(row.input_ids[a:b].tolist()))
            for a, b in mask_runs(row)]


def test_template_is_the_real_one():
    text = (ASSETS / "gpt_oss_chat_template.jinja").read_text()
    assert "<|start|>assistant<|channel|>analysis<|message|>" in text and "message.thinking" in text
    assert reasoning_key(text) == "thinking"
    assert reasoning_key((ASSETS / "qwen3_chat_template.jinja").read_text()) == "reasoning_content"


def test_harmony_multi_turn_reasoning_and_tool_call(oss_tok):
    """system -> user -> assistant tool call (with reasoning) -> tool -> final (with reasoning) -> user -> final.
    The template drops the tool call's analysis (a later final answer exists) and the earlier final's reasoning;
    only the last turn keeps it. Masks cover what the model wrote after each ``<|start|>assistant`` prompt."""
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "call weather", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "report it"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome.", "reasoning_content": "be polite",
         "finish_reason": "stop"},
    ]
    stats = RenderStats()
    row = ChatRenderer(oss_tok, {"reasoning_effort": "low"}).render("t", chat, tools=TOOLS, stats=stats)
    full = oss_tok.decode(row.input_ids.tolist())
    assert runs(oss_tok, row) == [
        ("<|start|>assistant", ' to=functions.weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'),
        ("<|start|>assistant", "<|channel|>final<|message|>It is sunny.<|end|>"),
        ("<|start|>assistant", "<|channel|>analysis<|message|>be polite<|end|><|start|>assistant"
                               "<|channel|>final<|message|>You are welcome.<|return|>"),
    ]
    assert "Reasoning: low" in full and "# Instructions\n\nBe brief." in full    # kwargs and developer message
    assert "call weather" not in full and "report it" not in full                # dropped by the template
    assert '<|start|>functions.weather to=assistant<|channel|>commentary<|message|>"sunny, 21C"<|end|>' in full
    assert stats.span_fallback == 0 and row.source == "template"
    # nothing of system / developer / user / tool is masked
    masked = "".join(t for _, t in runs(oss_tok, row))
    assert not any(s in masked for s in ("Be brief", "Weather in Paris", "sunny, 21C", "Thanks", "namespace"))


def test_harmony_tool_call_last_keeps_its_analysis(oss_tok):
    """A conversation ending on a tool call: no later final answer, so its analysis is rendered and masked."""
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "call weather", "tool_calls": [CALL]}]
    row = ChatRenderer(oss_tok).render("c", chat, tools=TOOLS)
    assert [t for _, t in runs(oss_tok, row)] == [
        '<|channel|>analysis<|message|>call weather<|end|><|start|>assistant to=functions.weather<|channel|>'
        'commentary json<|message|>{"city": "Paris"}<|call|>']


def test_harmony_clean_messages_maps_reasoning_and_arguments():
    msgs = [{"role": "assistant", "content": "", "reasoning": "r", "tool_calls": [CALL], "completion_token_ids": [1]}]
    out = clean_messages(msgs, "thinking", json_arguments=True)
    assert out == [{"role": "assistant", "content": "", "thinking": "r",
                    "tool_calls": [{**CALL, "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}]
    assert clean_messages(msgs)[0]["reasoning_content"] == "r" and "thinking" not in clean_messages(msgs)[0]
    text = "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>yo<|return|>"
    assert harmony_spans(text) == [(len("<|start|>user<|message|>hi<|end|><|start|>assistant"), len(text))]


# ---- stage 1 (fake OpenAI server returning reasoning) -> stage 2 (both families) --------------------------------

def _reasoning_server():
    """Answers the i-th request with content "answer i" and reasoning "think i" (vLLM's ``reasoning`` field on odd
    requests, the older ``reasoning_content`` on even ones); records the request bodies."""
    seen: list[dict] = []

    def respond(handler, body):
        seen.append(body)
        i = len(seen)
        field = "reasoning" if i % 2 else "reasoning_content"
        return 200, {"choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"answer {i}", field: f"think {i}"}}],
                     "usage": {"completion_tokens": 3}}

    server, url = serve_json(respond)
    return server, url, seen


def _stage1(conv_messages):
    from stage1_sample.client import ChatClient
    from stage1_sample.formats import Conversation
    from stage1_sample.regenerate import regenerate

    server, url, seen = _reasoning_server()

    async def go():
        async with ChatClient([url], "m", timeout=5, max_retries=0) as client:
            return await regenerate(client, Conversation("c", conv_messages, TOOLS),
                                    {"seed": 0, "max_tokens": 8, "temperature": 0.0})
    try:
        record, _ = asyncio.run(go())
    finally:
        server.shutdown()
    return record, seen


def test_reasoning_through_stage1_into_both_templates(oss_tok, qwen_tok):
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "call weather", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
            {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "old answer 2"}]
    record, seen = _stage1(conv)
    msgs = record["messages"]
    # kept per turn, in stage 1's schema (reasoning_content), whichever name the server used
    assert [(m.get("content"), m.get("reasoning_content")) for m in msgs if m["role"] == "assistant"] == [
        ("", "call weather"), ("answer 1", "think 1"), ("answer 2", "think 2")]
    # fed back to the server on later turns, under both names vLLM / SGLang read
    assert seen[0]["messages"][2]["reasoning"] == seen[0]["messages"][2]["reasoning_content"] == "call weather"
    second = seen[1]["messages"]
    assert second[4] == {"role": "assistant", "content": "answer 1", "reasoning": "think 1",
                         "reasoning_content": "think 1"}
    assert all("reasoning" not in m for m in second if m["role"] != "assistant")

    # stage 2, gpt-oss: the template reads `thinking`; only the last turn's reasoning survives
    row = ChatRenderer(oss_tok).render("c", msgs, tools=record.get("tools"))
    assert [t for _, t in runs(oss_tok, row)] == [
        ' to=functions.weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        "<|channel|>final<|message|>answer 1<|end|>",
        "<|channel|>analysis<|message|>think 2<|end|><|start|>assistant<|channel|>final<|message|>answer 2<|return|>"]

    # stage 2, Qwen3: the template reads `reasoning_content`; reasoning before the last user query is dropped
    row = ChatRenderer(qwen_tok, {"enable_thinking": True}).render("c", msgs, tools=record.get("tools"))
    spans = [t for _, t in runs(qwen_tok, row)]
    assert spans[0] == '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert spans[-1] == "<think>\nthink 2\n</think>\n\nanswer 2<|im_end|>"
    assert spans[1] == "answer 1<|im_end|>" and "think 1" not in qwen_tok.decode(row.input_ids.tolist())
