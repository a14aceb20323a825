"""Reading JSON text files record by record: the layer under ``formats`` that turns a file into raw records.

A ``.json`` / ``.jsonl`` / ``.ndjson`` file (optionally ``.gz``) is opened as UTF-8 with a leading byte-order
mark dropped, its layout is sniffed (``text_layout``: JSON lines, a JSON array, or JSON values written over
several lines), and it is decoded one record at a time in constant memory (``jsonl_records``,
``json_value_records``). A record that does not decode costs only itself: it comes out as a ``Skipped``. A file
that cannot be read at all or to its end raises ``InputFileError``. ``formats`` re-exports both, and
``from stage1_sample.formats import InputFileError, Skipped`` stays the public path; they live here so that
this module needs nothing from ``formats``.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

_HEAD = 4096              # characters read to sniff a text file's layout
_CHUNK = 1 << 20          # characters read at a time from a JSON array
_MAX_RECORD = 256 << 20   # a JSON record larger than this is treated as broken


@dataclass
class Skipped:
    id: str
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)


class InputFileError(ValueError):
    """An input that cannot be read at all (not one bad record): the message names the path and the problem."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


def parse_json(text: str) -> tuple[Any, str | None]:
    """(value, None), or (None, why ``text`` is not a JSON value)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, e.msg
    except RecursionError:  # json's C decoder recurses once per nesting level
        return None, "nested too deeply"


def _open_text(path: Path) -> Any:
    """``path`` (gzip-compressed when it ends in .gz) as UTF-8 text. ``utf-8-sig`` drops a leading byte-order mark;
    ``surrogateescape`` turns a byte that is not UTF-8 into a lone surrogate (U+DC80..U+DCFF), so it costs the
    record it lands in (``formats._json_problem``) instead of the whole file; ``newline=""`` keeps the text as
    written (lines still split at \\r, \\n and \\r\\n; JSON reads \\r as whitespace)."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a failure to read ``path`` (unreadable, a cut or corrupt gzip stream) into an ``InputFileError``."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut stream an EOFError
        broken_gzip = isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile))
        hint = ": the gzip stream is cut or corrupt (re-download or re-compress it)" if broken_gzip else ""
        raise InputFileError(path, f"cannot be read ({type(e).__name__}: {e}){hint}") from e


def text_layout(path: Path) -> str:
    """``array`` (a JSON array), ``values`` (JSON values written over several lines: a pretty-printed object, or
    several one after another) or ``lines`` (JSON lines), from how the file's first JSON value is written."""
    with reading(path), _open_text(path) as f:
        buf = f.read(_HEAD).lstrip()
        if not buf:
            return "lines"  # no records
        if buf.startswith("["):
            return "array"
        if not buf.startswith("{"):
            raw = buf[:16].encode("utf-8", "surrogateescape")
            is_utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff"))  # UTF-16's byte-order marks
            utf16 = " (a UTF-16 byte-order mark: save it as UTF-8)" if is_utf16 else ""
            raise InputFileError(path, "is not JSON: a JSON array, JSON object or JSON lines starts with [ or {, "
                                       f"this file starts with {raw!r}{utf16}")
        decoder = json.JSONDecoder()
        while True:  # decode the first value; a JSON line never holds a newline (strings escape it)
            try:
                _, end = decoder.raw_decode(buf)
                return "values" if "\n" in buf[:end] or "\r" in buf[:end] else "lines"
            except json.JSONDecodeError as e:
                if not _may_be_incomplete(e, buf) or len(buf) >= _MAX_RECORD:
                    return "lines"  # a broken first line: JSON lines cost only that line
            except RecursionError:
                return "lines"
            more = f.read(max(_CHUNK, len(buf)))  # doubling keeps re-decoding linear in the value's size
            if not more:
                return "lines"
            buf += more


def _may_be_incomplete(e: json.JSONDecodeError, buf: str) -> bool:
    """The decoder stopped at the end of ``buf``: more text may complete the value."""
    return e.msg.startswith("Unterminated") or e.pos >= len(buf) - 64


def jsonl_records(path: Path) -> Iterator[Any]:
    """One record per non-blank line; a line that does not decode is a ``Skipped`` named ``FILE:LINE``."""
    with reading(path), _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            value, error = parse_json(line)
            yield value if error is None else Skipped(f"{path.name}:{lineno}", f"broken JSON on line {lineno}: {error}")


def json_value_records(path: Path, in_array: bool) -> Iterator[Any]:
    """Decode a top-level JSON array (``in_array``), or JSON values written one after another, one value at a
    time (constant memory, tolerant of a cut tail).

    After a broken record we resynchronise on the text that opened the first record (e.g. ``\\n  {\\n
    "id"``), so a record broken in the middle of the file costs that record only.
    """
    decoder = json.JSONDecoder()
    separators = " \t\r\n," if in_array else " \t\r\n"
    with reading(path), _open_text(path) as f:
        buf, eof, index, opening = f.read(_CHUNK), False, 0, None
        pos = buf.index("[") + 1 if in_array else 0
        while True:
            while True:  # skip separators, refilling the buffer as needed
                while pos < len(buf) and buf[pos] in separators:
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = buf[pos:] + f.read(_CHUNK), 0
                eof = len(buf) == 0
            if pos >= len(buf) or (in_array and buf[pos] == "]"):
                return
            if opening is None:
                opening = _record_opening(buf, pos)
            try:
                record, end = decoder.raw_decode(buf, pos)
            except (json.JSONDecodeError, RecursionError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                incomplete = isinstance(e, json.JSONDecodeError) and _may_be_incomplete(e, buf)
                if incomplete and not eof and len(buf) - pos < _MAX_RECORD:  # read more, retry
                    more = f.read(max(_CHUNK, len(buf) - pos))
                    buf, pos, eof = buf[pos:] + more, 0, more == ""
                    continue
                yield Skipped(f"{path.name}:{index}", f"broken JSON in record {index}: {msg}")
                index += 1
                nxt = buf.find(opening, pos + 1) if opening else -1
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


def _record_opening(buf: str, pos: int) -> str:
    """The text that opens the object at ``pos``, from its line's start to its first key (``'\\n  {\\n    "id"'``):
    records written by one program open alike, so the next one after a broken record is found by searching for
    it. Empty (no resynchronisation) when the record is not an object with a key."""
    if buf[pos] != "{":
        return ""
    key_start = buf.find('"', pos)
    key_end = buf.find('"', key_start + 1) if key_start >= 0 else -1
    if key_end < 0:
        return ""
    line_start = buf.rfind("\n", 0, pos)
    return buf[line_start if line_start >= 0 else pos : key_end + 1]
