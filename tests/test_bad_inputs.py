"""Bad input files never crash a stage (issue 15, items 5-8).

One table of generated inputs, each read three ways: ``load_conversations`` itself, stage 1's loop (the real
client against a local HTTP server, the real writer, its accounting and ``skipped.jsonl``) and stage 2's
``iter_rendered`` (the real SmolLM2 chat template, its ``RenderStats``). Every row states the exact outcome:
which records are kept and which are skipped with what reason, or the error that names the file.
"""
from __future__ import annotations

import asyncio
import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from stage1_sample.client import ChatClient
from stage1_sample.formats import InputFileError, load_conversations
from stage1_sample.regenerate import run_loop
from stage1_sample.writer import ConversationWriter
from tests.fixtures.http_server import serve_json

BOM = b"\xef\xbb\xbf"
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 4, "seed": 0, "chat_template_kwargs": {}}
ANSWER = {"id": "x", "object": "chat.completion", "prompt_token_ids": [1, 2],
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop",
                       "token_ids": [7]}],
          "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
DEPTH = 100_000  # far past the recursion limit json's C decoder keeps to
BYTE_E9 = "text that cannot be encoded as UTF-8: the byte 0xe9, which is not UTF-8 (or a lone surrogate \\udce9)"
BYTE_FF = "text that cannot be encoded as UTF-8: the byte 0xff, which is not UTF-8 (or a lone surrogate \\udcff)"


def conv(cid: str, text: str = "Hi", **message_fields) -> dict:
    return {"id": cid, "messages": [{"role": "user", "content": text},
                                    {"role": "assistant", "content": "old answer", **message_fields}]}


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name
    return build


def cut_gzip(folder: Path) -> Path:
    """200 records compressed, the stream cut in the middle (a download that stopped)."""
    data = gzip.compress(jsonl([conv(f"g{i}") for i in range(200)]))
    (folder / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    return folder / "cut.jsonl.gz"


def unfinished_stage1(folder: Path) -> Path:
    """What a killed stage-1 run leaves: one final shard, one partial shard, the logs, no manifest.json."""
    out = folder / "sample"
    writer = ConversationWriter(out, "jsonl", rows_per_shard=2)
    for i in range(3):
        writer.write(conv(f"s{i}", finish_reason="stop"))
    writer.close()
    return out


def changed_stage1(folder: Path) -> Path:
    """A finished stage-1 folder whose shard was edited after the manifest was written."""
    out = folder / "sample"
    writer = ConversationWriter(out, "jsonl", rows_per_shard=2)
    writer.write(conv("s0", finish_reason="stop"))
    writer.finish({}, {"input": 1, "written": 1, "skipped": 0, "failed": 0})
    with open(out / "shard-00000.jsonl", "ab") as f:
        f.write(jsonl([conv("s1")]))
    return out


def tool_calls_as_text() -> bytes:
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]
    with_calls = {"id": "t0", "messages": [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": json.dumps(calls)},
        {"role": "tool", "content": "1", "tool_call_id": "c1"},
        {"role": "assistant", "content": "done"}]}
    broken = {"id": "t1", "messages": [{"role": "user", "content": "add"},
                                       {"role": "assistant", "content": None, "tool_calls": "add(1"}]}
    return jsonl([with_calls, broken, conv("t2")])


@dataclass
class Row:
    name: str
    build: Callable[[Path], Path]
    # [(id, None)] for a kept conversation, [(id, reason)] for a skipped record; or a regex the error must match
    expect: list[tuple[str, str | None]] | str


ROWS = [
    Row("binary", write("blob.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        r"blob\.jsonl: is not JSON: a JSON array, JSON object or JSON lines starts with \[ or \{, this file starts "
        r"with b'\\x89PNG\\r\\n\\x1a\\n"),
    Row("latin-1", write("latin1.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        conv("l0", "café"), conv("l1"), conv("l2", "naïve résumé")]).encode("latin-1")),
        [("l0", BYTE_E9), ("l1", None),
         ("l2", "text that cannot be encoded as UTF-8: the byte 0xef, which is not UTF-8 (or a lone surrogate "
                "\\udcef)")]),
    Row("one bad byte in a JSON array", write("onebad.json", json.dumps(
        [conv("b0"), conv("b1", "XX"), conv("b2")], indent=2).encode().replace(b"XX", b"a\xffb")),
        [("b0", None), ("b1", BYTE_FF), ("b2", None)]),
    Row("truncated .jsonl.gz", cut_gzip,
        r"cut\.jsonl\.gz: cannot be read \(EOFError: Compressed file ended before the end-of-stream marker was "
        r"reached\): the gzip stream is cut or corrupt"),
    Row("invalid .parquet", write("bad.parquet", b"PAR1" + b"not a parquet file" * 8),
        r"bad\.parquet: is not a readable Parquet file \(ArrowInvalid: Parquet magic bytes not found"),
    Row("tool_calls as a JSON string", write("tools.jsonl", tool_calls_as_text()),
        [("t0", None), ("t1", "message 1: tool_calls is a string that is not JSON (Expecting value)"),
         ("t2", None)]),
    Row("non-list where a list belongs", write("shapes.jsonl", jsonl([
        {"id": "n0", "messages": {"role": "user", "content": "Hi"}},
        conv("n1", prompt_token_ids=5),
        {**conv("n2"), "tools": {"type": "function", "function": {"name": "add"}}},
        conv("n3", tool_calls={"name": "add"}),
        conv("n4")])),
        [("n0", "`messages` is a dict, not a list"),
         ("n1", "message 1: prompt_token_ids is an int, not a list of integers"),
         ("n2", "tools is a dict, not a list"),
         ("n3", "message 1: tool_calls is a dict, not a list"),
         ("n4", None)]),
    Row("deeply nested JSON", write("deep.jsonl", jsonl([conv("d0")]) + b'{"id": "d1", "messages": '
                                    + b"[" * DEPTH + b"]" * DEPTH + b"}\n" + jsonl([conv("d2")])),
        [("d0", None), ("deep.jsonl:2", "broken JSON on line 2: nested too deeply"), ("d2", None)]),
    Row("lone surrogate", write("surrogate.jsonl", jsonl([conv("u0", "\ud800"), conv("\udfff"), conv("u2")])),
        [("u0", "text that cannot be encoded as UTF-8: a lone surrogate \\ud800"),
         ("surrogate-1", "id '\\udfff' cannot be encoded as UTF-8"), ("u2", None)]),
    Row("BOM JSONL", write("bom.jsonl", BOM + jsonl([conv("j0"), conv("j1"), conv("j2")])),
        [("j0", None), ("j1", None), ("j2", None)]),
    Row("BOM JSON array", write("bom.json", BOM + json.dumps([conv("a0"), conv("a1"), conv("a2")], indent=2).encode()),
        [("a0", None), ("a1", None), ("a2", None)]),
    Row("single JSON object", write("one.json", json.dumps(conv("o0"), indent=2).encode()), [("o0", None)]),
    Row("incomplete stage-1 folder", unfinished_stage1,
        r"sample: stage 1 did not finish \(it has no manifest\.json; it holds failed\.jsonl, "
        r"shard-00000\.jsonl, shard-00001\.jsonl\.partial, skipped\.jsonl\) — re-run the same `make sample` "
        r"\(sample\.output=\S+/sample, the same settings\) to resume and finish it"),
    Row("stage-1 shard changed after its manifest", changed_stage1,
        r"shard-00000\.jsonl: does not match the sha256 in manifest\.json"),
]


@pytest.fixture(scope="module")
def chat_url():
    """A real HTTP server that answers every chat request with one token."""
    server, url = serve_json(lambda handler, body: (200, ANSWER))
    yield url
    server.shutdown()


@pytest.fixture(scope="module")
def renderer(smollm2_dir):
    from transformers import AutoTokenizer

    from stage2_hidden.render import ChatRenderer

    return ChatRenderer(AutoTokenizer.from_pretrained(smollm2_dir))


def stage1(spec: Path, out: Path, url: str) -> tuple[dict, list[dict]]:
    """Stage 1's loop over ``spec``: (the manifest's accounting, the lines of skipped.jsonl)."""
    writer = ConversationWriter(out, "jsonl", rows_per_shard=100)

    async def go():
        async with ChatClient([url], "m", timeout=10, max_retries=0) as client:
            return await run_loop(load_conversations(spec), client, writer, SAMPLING, concurrency=4)

    try:
        tally = asyncio.run(go())
    except BaseException:
        writer.close()  # as stage 1's entry point does: the partial shard stays for a resume
        raise
    manifest = writer.finish({}, tally.accounting())
    return manifest["accounting"], [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def stage2(spec: Path, renderer):
    """Stage 2's reading and rendering of ``spec``: its ``RenderStats``."""
    from stage2_hidden.config import HiddenConfig
    from stage2_hidden.pipeline import iter_rendered
    from stage2_hidden.render import RenderStats

    stats = RenderStats()
    list(iter_rendered(HiddenConfig(input=str(spec)), renderer, 4096, stats))
    return stats


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_is_a_counted_skip_or_an_error_naming_the_file(row, tmp_path, chat_url, renderer):
    spec = row.build(tmp_path)
    if isinstance(row.expect, str):
        with pytest.raises(InputFileError, match=row.expect):
            list(load_conversations(spec))
        with pytest.raises(InputFileError, match=row.expect):
            stage1(spec, tmp_path / "out", chat_url)
        with pytest.raises(InputFileError, match=row.expect):
            stage2(spec, renderer)
        return
    items = list(load_conversations(spec))
    assert [(item.id, getattr(item, "reason", None)) for item in items] == row.expect
    skipped = [(cid, reason) for cid, reason in row.expect if reason is not None]
    num_kept = len(row.expect) - len(skipped)

    accounting, skip_log = stage1(spec, tmp_path / "out", chat_url)
    assert accounting == {"input": len(row.expect), "written": num_kept, "skipped": len(skipped), "failed": 0}
    assert skip_log == [{"id": cid, "reason": reason} for cid, reason in skipped]

    stats = stage2(spec, renderer)
    assert (stats.input, stats.rendered) == (len(row.expect), num_kept)
    assert stats.skipped == dict(Counter(f"input: {reason}" for _, reason in skipped))


def test_tool_calls_given_as_json_text_are_decoded(tmp_path):
    conv_t0 = next(iter(load_conversations(write("tools.jsonl", tool_calls_as_text())(tmp_path))))
    assert conv_t0.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]}
