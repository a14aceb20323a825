"""Turn-by-turn regeneration and the stage-1 run loop.

Every assistant turn is replaced by the target's own answer to the history before it, where that history
already holds the target's earlier answers (so turn k is conditioned on what the target itself said at
turns < k). Assistant turns that carry ``tool_calls`` are kept as they are: the tool messages after them
answer those exact calls. A conversation that ends on a user or tool turn gets one more, generated,
answer. An assistant turn right after another one is dropped (it answers nothing new). The first failed
turn fails the whole conversation (recorded with the server's message, e.g. the context is too long, or
why its answers were malformed or late); the run goes on with the others.

``sample.max_conversation_tokens`` (a ``ContextBudget``) stops a conversation where stage 2 cuts it
(``hidden.max_length`` with ``on_too_long=truncate``): before each turn the prompt is rendered with the target's
chat template as the server will see it (n tokens); the answer may take min(max_tokens, L - n + MARGIN) tokens,
and once n >= L the conversation ends at its last answer. Nothing inside the first L tokens changes: a greedy
answer's first k tokens do not depend on the tokens after them, and no later turn starts before position L.
MARGIN covers a re-tokenisation that counts a few tokens differently, so the cut answer still runs past L and its
end-of-turn token stays outside the trained window.
"""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from tqdm import tqdm

from .client import ChatClient, RequestError
from .formats import Conversation, Skipped
from .writer import ConversationWriter

log = logging.getLogger(__name__)


class PromptTooLong(Exception):
    """The conversation's first prompt alone reaches ``sample.max_conversation_tokens``: nothing to train on."""


class ContextBudget:
    """Tokens a conversation may reach (``sample.max_conversation_tokens``), counted with the target's template."""

    MARGIN = 8  # tokens past the limit each cut answer runs (module docstring)

    def __init__(self, max_tokens: int, renderer: Any):
        self.max_tokens = max_tokens
        self.renderer = renderer   # stage2_hidden.render.ChatRenderer: the prompt exactly as the server sees it
        self.num_cut = 0           # conversations that ended at the limit (their later turns not generated)

    def room(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        """Tokens left before the limit once ``messages`` (plus the generation prompt) are rendered."""
        return self.max_tokens - len(self.renderer.prompt_ids(messages, tools))

    @classmethod
    def for_target(cls, max_tokens: int, path: str, trust_remote_code: bool = False,
                   chat_template_kwargs: dict[str, Any] | None = None) -> "ContextBudget":
        from transformers import AutoTokenizer

        from stage2_hidden.render import ChatRenderer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(max_tokens, ChatRenderer(tokenizer, chat_template_kwargs))


def turn_seed(seed: int | None, cid: str, turn: int) -> int | None:
    """Per-request seed independent of scheduling order: same config -> same answers, any concurrency."""
    if seed is None:
        return None
    return (seed * 1_000_003 + zlib.crc32(cid.encode()) + turn) % (2**31 - 1)


async def regenerate(client: ChatClient, conv: Conversation, sampling: dict[str, Any],
                     on_tokens: Callable[[int], None] | None = None,
                     budget: ContextBudget | None = None) -> tuple[dict[str, Any], int]:
    """(conversation with regenerated assistant turns, generated tokens). Raises ``RequestError``, and
    ``PromptTooLong`` when ``budget`` leaves no room for the first answer.

    ``on_tokens(n)`` is called after every answered turn with its generated tokens (the live tokens/s)."""
    out: list[dict[str, Any]] = []
    num_tokens, answered = 0, 0   # answered: len(out) after the last generated answer
    msgs = conv.messages

    async def answer(turn: int) -> bool:
        """Append the target's answer to ``out``; False (nothing sent) when the budget is spent."""
        nonlocal num_tokens, answered
        max_tokens = sampling["max_tokens"]
        if budget is not None:
            room = budget.room(out, conv.tools)
            if room <= 0:
                return False
            max_tokens = min(max_tokens, room + budget.MARGIN)
        result = await client.chat(out, tools=conv.tools, seed=turn_seed(sampling["seed"], conv.id, turn),
                                   **{**{k: v for k, v in sampling.items() if k != "seed"}, "max_tokens": max_tokens})
        out.append(result.message)
        num_tokens, answered = num_tokens + result.num_completion_tokens, len(out)
        if on_tokens is not None:
            on_tokens(result.num_completion_tokens)
        return True

    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant" or msg.get("tool_calls"):
            out.append({k: v for k, v in msg.items() if k not in ("prompt_token_ids", "completion_token_ids")})
            continue
        if not out or out[-1]["role"] == "assistant":
            continue  # two assistant turns in a row: the second answers nothing new; drop it
        if not await answer(i):
            return _cut(conv, out[:answered], budget), num_tokens
    if out[-1]["role"] in ("user", "tool") and not await answer(len(msgs)):
        return _cut(conv, out[:answered], budget), num_tokens
    return Conversation(conv.id, out, conv.tools).to_json(), num_tokens


def _cut(conv: Conversation, kept: list[dict[str, Any]], budget: ContextBudget) -> dict[str, Any]:
    """The conversation up to its last generated answer, ``kept`` (what follows it is past the budget's limit)."""
    if not kept:
        raise PromptTooLong(f"its first prompt already has >= {budget.max_tokens} tokens "
                            "(sample.max_conversation_tokens): nothing of it would be trained on")
    budget.num_cut += 1
    return Conversation(conv.id, kept, conv.tools).to_json()


@dataclass
class Tally:
    input: int = 0
    written: int = 0      # this pass + earlier passes (resume)
    resumed: int = 0      # of which were already in the shards
    skipped: int = 0
    failed: int = 0
    tokens: int = 0       # output tokens generated in this pass (every answered turn, failed conversations too)
    start: float = field(default_factory=time.monotonic)
    end: float | None = None  # set when the loop is over (the throughput's clock stops there)

    def accounting(self) -> dict[str, int]:
        return {"input": self.input, "written": self.written, "skipped": self.skipped, "failed": self.failed}

    def seconds(self) -> float:
        return (self.end if self.end is not None else time.monotonic()) - self.start

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds(), 1e-9)

    def throughput(self) -> dict[str, float]:
        """Output tokens/s of this pass (server start-up excluded), as stored in the manifest."""
        return {"output_tokens": self.tokens, "seconds": round(self.seconds(), 3),
                "output_tokens_per_s": round(self.tokens_per_s(), 2)}

    def line(self) -> str:
        return (f"accounting: input {self.input} = written {self.written} + skipped {self.skipped} "
                f"+ failed {self.failed} (resumed {self.resumed}; {self.tokens} tokens generated in "
                f"{self.seconds():.1f} s = {self.tokens_per_s():.1f} output tokens/s)")


async def run_loop(
    items: Iterable[Conversation | Skipped],
    client: ChatClient,
    writer: ConversationWriter,
    sampling: dict[str, Any],
    concurrency: int,
    total: int | None = None,
    tools_refused: str | None = None,
    budget: ContextBudget | None = None,
) -> Tally:
    """Regenerate ``items`` with at most ``concurrency`` conversations in flight; write as they finish.

    ``budget``: ``sample.max_conversation_tokens`` (see the module docstring); a conversation whose first prompt
    reaches it is skipped with that reason.

    ``tools_refused``: why the server cannot take requests with ``tools`` (a launched vLLM without a tool parser
    answers 400 to each); conversations with tools are then skipped with that reason. None: they are sent.

    The progress bar shows conversations (done / total, conv/s) and the output tokens/s of this pass
    (``out_tok/s``, counted per answered turn and refreshed every second even while no conversation ends)."""
    tally = Tally()
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    bar = tqdm(total=total, unit="conv", desc="stage1", dynamic_ncols=True)

    def postfix(refresh: bool) -> None:
        bar.set_postfix({"out_tok/s": f"{tally.tokens_per_s():.1f}", "tokens": tally.tokens,
                         "failed": tally.failed, "skipped": tally.skipped}, refresh=refresh)

    def progress() -> None:
        postfix(refresh=False)
        bar.update(1)

    def on_tokens(n: int) -> None:
        tally.tokens += n

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1.0)
            postfix(refresh=True)

    async def one(conv: Conversation) -> None:
        try:
            record, _ = await regenerate(client, conv, sampling, on_tokens=on_tokens, budget=budget)
        except PromptTooLong as e:
            writer.skip(conv.id, str(e))
            tally.skipped += 1
        except RequestError as e:
            writer.fail(conv.id, str(e))
            tally.failed += 1
        else:
            writer.write(record)
            tally.written += 1
        finally:
            sem.release()
        progress()

    errors: list[BaseException] = []
    tick = asyncio.create_task(ticker())

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())

    try:
        for item in items:
            tally.input += 1
            if isinstance(item, Skipped):
                writer.skip(item.id, item.reason, **item.extra)
                tally.skipped += 1
                progress()
            elif item.id in writer.done_ids:  # before the tools rule: a row in the shards stays written
                tally.written += 1
                tally.resumed += 1
                progress()
            elif item.tools and tools_refused:
                writer.skip(item.id, tools_refused)
                tally.skipped += 1
                progress()
            else:
                await sem.acquire()
                task = asyncio.create_task(one(item))
                tasks.add(task)
                task.add_done_callback(done)
            if errors:
                raise errors[0]  # a bug or a disk error, not a request failure: stop the run
            await asyncio.sleep(0)
        if tasks:
            await asyncio.gather(*tasks)
        if errors:
            raise errors[0]
    finally:
        tally.end = time.monotonic()
        tick.cancel()
        for t in tasks:
            t.cancel()
        postfix(refresh=True)
        bar.close()
    return tally
