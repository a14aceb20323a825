"""Stage 1 client retries against real local HTTP servers (no mocks): 503 then 200, dropped connections,
non-retryable 4xx, exhausted retries, round robin."""
from __future__ import annotations

import asyncio

import pytest

from stage1_sample.client import ChatClient, RequestError
from tests.fixtures.http_server import serve_json

OK_BODY = {
    "id": "x", "object": "chat.completion", "prompt_token_ids": [1, 2, 3],
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello", "reasoning_content": "hmm"},
                 "finish_reason": "stop", "token_ids": [7, 8]}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
# what `transformers serve` answers: no token ids anywhere, the count only in usage
TEXT_BODY = {
    "id": "y", "object": "chat.completion", "model": "/m@main",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34},
}


def serve(script: list[str]):
    """A real HTTP server on 127.0.0.1 answering the i-th POST per ``script[i]`` (the last entry repeats):
    "ok", "text" (a body without token ids), "503", "429", "400", or "drop" (close the connection without answering)."""
    seen: list[dict] = []

    def respond(handler, body):
        seen.append({"path": handler.path, "body": body, "auth": handler.headers.get("Authorization")})
        action = script[min(len(seen) - 1, len(script) - 1)]
        if action == "drop":
            handler.close_connection = True
            handler.connection.close()
            return None
        if action in ("ok", "text"):
            return 200, OK_BODY if action == "ok" else TEXT_BODY
        status = int(action)
        return status, {"error": {"message": f"server says {status}", "type": "BadRequestError", "code": status}}

    server, url = serve_json(respond)
    return server, url, seen


def _chat(urls, **kw):
    async def go():
        async with ChatClient(urls, "m", backoff_base=0.01, backoff_max=0.05, timeout=5, **kw) as client:
            result = await client.chat([{"role": "user", "content": "hi", "prompt_token_ids": [9]}], seed=3,
                                       max_tokens=4, chat_template_kwargs={"enable_thinking": False})
            return result, client.num_retries
    return asyncio.run(go())


@pytest.mark.parametrize("script", [["503", "503", "ok"], ["429", "ok"], ["drop", "drop", "ok"]])
def test_retries_then_succeeds(script):
    server, url, seen = serve(script)
    try:
        result, retries = _chat([url], max_retries=3)
    finally:
        server.shutdown()
    assert retries == len(script) - 1 and len(seen) == len(script)
    assert result.message == {"role": "assistant", "content": "hello", "reasoning_content": "hmm",
                              "prompt_token_ids": [1, 2, 3], "completion_token_ids": [7, 8], "finish_reason": "stop"}
    assert result.num_completion_tokens == 2
    body = seen[-1]["body"]
    assert seen[-1]["path"] == "/v1/chat/completions"
    assert body["return_token_ids"] is True and body["seed"] == 3 and body["max_tokens"] == 4
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["messages"] == [{"role": "user", "content": "hi"}]  # our extra fields are not sent


def test_client_4xx_is_not_retried_and_carries_the_server_message():
    server, url, seen = serve(["400"])
    try:
        with pytest.raises(RequestError, match="HTTP 400 .*server says 400") as info:
            _chat([url], max_retries=5)
    finally:
        server.shutdown()
    assert len(seen) == 1 and info.value.status == 400


def test_gives_up_after_max_retries():
    server, url, seen = serve(["drop"])
    try:
        with pytest.raises(RequestError, match="gave up after 3 attempts"):
            _chat([url], max_retries=2)
    finally:
        server.shutdown()
    assert len(seen) == 3


def test_round_robin_fails_over_to_a_live_server(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "secret-key")
    from stage1_sample.client import api_key_from_env

    dead, dead_url, dead_seen = serve(["503"])
    live, live_url, live_seen = serve(["ok"])
    try:
        result, retries = _chat([dead_url, live_url + "/v1"], max_retries=2, api_key=api_key_from_env())
    finally:
        dead.shutdown()
        live.shutdown()
    assert result.message["content"] == "hello" and retries == 1
    assert len(dead_seen) == 1 and len(live_seen) == 1 and live_seen[0]["auth"] == "Bearer secret-key"


def test_text_only_server_gets_no_return_token_ids_and_yields_text():
    """engine=transformers: `transformers serve` rejects unknown fields (HTTP 422), so the field is not sent;
    the answer has no token ids (stage 2 re-tokenises) and the token count comes from usage."""
    server, url, seen = serve(["text"])
    try:
        result, retries = _chat([url], max_retries=0, return_token_ids=False)
    finally:
        server.shutdown()
    assert "return_token_ids" not in seen[0]["body"] and retries == 0
    assert result.message == {"role": "assistant", "content": "hi there", "finish_reason": "length"}
    assert result.num_completion_tokens == 4
