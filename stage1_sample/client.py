"""Async client of OpenAI-compatible chat servers: round robin, retries with backoff, vLLM token ids.

Retried (exponential backoff with full jitter, honouring ``Retry-After``): connection errors, dropped
connections, timeouts, HTTP 408 / 429 / 5xx, and a 200 whose body is not a chat completion (not JSON, or a
``message`` that is not an object: a proxy's error page, a server bug). Any other 4xx (e.g. the context is too
long) raises ``RequestError`` at once with the server's message; so do exhausted retries, so one bad answer
fails one conversation, never the run. ``timeout`` is a deadline for the whole request (connect, queueing,
generation, the body): httpx's own timeout restarts at every read, so a server trickling bytes would hold a
request for ever. The API key comes from ``VLLM_API_KEY`` or ``OPENAI_API_KEY`` and is never logged.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import httpx

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_STATUS = {408, 429}
OPENAI_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")
# An assistant turn's reasoning (stored as ``reasoning_content``) goes back to the server under both names: vLLM
# reads ``reasoning`` (it renames the deprecated ``reasoning_content``) and hands the template both (Qwen3 reads
# ``reasoning_content``) or, for gpt-oss, turns it into a harmony ``analysis`` message (dropped by the harmony rules
# once a later final answer exists); SGLang and older vLLM read ``reasoning_content``. The template decides which
# earlier reasoning the model sees, exactly as stage 2's render of the same turns does.
REASONING_KEYS = ("reasoning", "reasoning_content")


def server_message(m: dict[str, Any]) -> dict[str, Any]:
    """A stored message as sent back to the server: the OpenAI keys, plus an assistant turn's reasoning."""
    out = {k: m[k] for k in OPENAI_MESSAGE_KEYS if k in m}
    if m.get("role") == "assistant":
        reasoning = m.get("reasoning_content") or m.get("reasoning") or m.get("thinking")
        if reasoning:
            out.update({k: reasoning for k in REASONING_KEYS})
    return out


class RequestError(Exception):
    """A request that failed for good (not retryable, or retries exhausted)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class MalformedResponse(ValueError):
    """A 200 answer that is not a chat completion (retried like a 5xx: the next attempt may be fine)."""


@dataclass
class ChatResult:
    message: dict[str, Any]   # {"role": "assistant", "content", ["reasoning_content"], ["tool_calls"], ...}
    num_completion_tokens: int


def api_key_from_env() -> str | None:
    return os.environ.get("VLLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


def base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/`` or ``http://h:p/v1`` -> ``http://h:p/v1``."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class ChatClient:
    def __init__(
        self,
        urls: list[str],
        model: str,
        *,
        timeout: float = 600.0,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        api_key: str | None = None,
        return_token_ids: bool = True,
        extra_body: dict[str, Any] | None = None,
    ):
        """``return_token_ids=False`` for servers that reject the field (``transformers serve``: HTTP 422);
        ``extra_body``: fields added to every chat request (``common.server.sampling_fields``)."""
        if not urls:
            raise ValueError("ChatClient needs at least one server URL")
        self.urls = [base_url(u) for u in urls]
        self._next_url = itertools.cycle(self.urls)
        self.model = model
        self.return_token_ids = return_token_ids
        self.extra_body = dict(extra_body or {})
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout), headers=headers, limits=limits)
        self.num_retries = 0  # total retries so far (a health signal for the progress bar / tests)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        parse: Callable[[Any], ChatResult] | None = None,
    ) -> ChatResult:
        """One assistant turn for ``messages``; the returned message carries vLLM's token ids (when it sends them).
        ``parse``: the answer's reader (default ``parse_response``; evaluation.engines keeps SGLang's meta_info)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [server_message(m) for m in messages],
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
        }
        body.update(self.extra_body)  # engine-specific fields (common.server.sampling_fields)
        if self.return_token_ids:
            body["return_token_ids"] = True  # vLLM: prompt_token_ids on the response, token_ids per choice
        if tools:
            body["tools"] = tools
        if seed is not None:
            body["seed"] = seed
        if chat_template_kwargs:
            body["chat_template_kwargs"] = chat_template_kwargs
            if chat_template_kwargs.get("reasoning_effort") is not None:
                # gpt-oss: vLLM's harmony renderer reads the request's reasoning_effort, not the template kwargs
                body["reasoning_effort"] = chat_template_kwargs["reasoning_effort"]
        return await self.post("/chat/completions", body, parse or parse_response)

    async def post(self, path: str, body: dict[str, Any], parse: Callable[[Any], T]) -> T:
        """POST with retries, ``parse(JSON body)`` of the first good 200; the next server of the round robin takes
        each attempt. ``parse`` raises ``MalformedResponse`` for a body it cannot use (retried)."""
        for attempt in range(self.max_retries + 1):
            url = next(self._next_url) + path
            delay: float | None = None
            try:
                async with asyncio.timeout(self.timeout):  # the whole request, not one read (module docstring)
                    resp = await self._http.post(url, json=body)
            except TimeoutError:
                error = f"no complete answer within the {self.timeout:g} s request deadline ({url})"
            except httpx.TransportError as e:  # connect / read / write errors, dropped connections, timeouts
                error = f"{type(e).__name__}: {e or 'no detail'} ({url})"
            else:
                if resp.status_code == 200:
                    try:
                        return parse(_json_body(resp))
                    except MalformedResponse as e:
                        error = f"malformed answer from {url}: {e}"
                else:
                    error = f"HTTP {resp.status_code} from {url}: {_server_message(resp)}"
                    if resp.status_code not in RETRY_STATUS and resp.status_code < 500:
                        raise RequestError(error, resp.status_code)
                    delay = _retry_after(resp)
            if attempt == self.max_retries:
                raise RequestError(f"gave up after {attempt + 1} attempts; last: {error}")
            # full jitter: uniform(0, min(max, base * 2^attempt)) spreads a thundering herd
            delay = delay if delay is not None else random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
            self.num_retries += 1
            log.warning("retry %d/%d in %.2fs: %s", attempt + 1, self.max_retries, delay, error)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def parse_response(data: Any) -> ChatResult:
    """vLLM chat completion -> the assistant message in the stage-1 schema (docs/CONTRACTS.md).

    Raises ``MalformedResponse`` for anything else: every field stage 1 stores is checked for its type here,
    so a wrong answer fails its own request instead of a later stage (or the run loop)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    msg = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(msg, dict):
        raise MalformedResponse(f"no choices[0].message object in {str(data)[:300]}")
    content = _typed(msg.get("content"), str, "message.content")
    out: dict[str, Any] = {"role": "assistant", "content": content or ""}
    # the name changed across vLLM versions
    reasoning = _typed(msg.get("reasoning_content"), str, "message.reasoning_content") or \
        _typed(msg.get("reasoning"), str, "message.reasoning")
    if reasoning:
        out["reasoning_content"] = reasoning
    if _typed(msg.get("tool_calls"), list, "message.tool_calls"):
        out["tool_calls"] = msg["tool_calls"]
    if data.get("prompt_token_ids") is not None:
        out["prompt_token_ids"] = _token_ids(data["prompt_token_ids"], "prompt_token_ids")
    if choice.get("token_ids") is not None:
        out["completion_token_ids"] = _token_ids(choice["token_ids"], "choices[0].token_ids")
    out["finish_reason"] = _typed(choice.get("finish_reason"), str, "finish_reason")
    usage = _typed(data.get("usage"), dict, "usage") or {}
    num = _typed(usage.get("completion_tokens"), int, "usage.completion_tokens")
    return ChatResult(out, num if num is not None else len(out.get("completion_token_ids", ())))


def _typed(value: Any, kind: type, what: str) -> Any:
    """``value`` when it is None or a ``kind``; else ``MalformedResponse`` naming the field."""
    if value is not None and not isinstance(value, kind):
        raise MalformedResponse(f"{what} is a {type(value).__name__}, not a {kind.__name__}: {str(value)[:200]}")
    return value


def _token_ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
        raise MalformedResponse(f"{what} is not a list of integers: {str(value)[:200]}")
    return value


def _json_body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError as e:  # not JSON, or not UTF-8
        raise MalformedResponse(f"body is not JSON ({e}): {resp.text[:200]!r}") from None


def _server_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:500]
        return str(err)[:500]
    return str(data)[:500]


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None
