"""The Parquet encoding of stage-1 conversations (``sample.format=parquet``).

One row per conversation: ``id`` string, ``messages`` list<struct> with every optional message field
as a nullable column, token ids as list<int32>, and ``tool_calls`` / ``tools`` as JSON text (their shape
is free-form). ``iter_rows`` reads any Parquet file back as plain rows; ``formats.normalize_record`` takes
these rows as they are (it ignores null fields and decodes JSON-text ``tool_calls`` / ``tools``, as it does
for every input), so the encoding is undone in one place.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGE_TYPE = pa.struct([
    ("role", pa.string()),
    ("content", pa.string()),
    ("reasoning_content", pa.string()),
    ("tool_calls", pa.string()),
    ("tool_call_id", pa.string()),
    ("name", pa.string()),
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("completion_token_ids", pa.list_(pa.int32())),
    ("finish_reason", pa.string()),
])
SCHEMA = pa.schema([("id", pa.string()), ("messages", pa.list_(MESSAGE_TYPE)), ("tools", pa.string())])


def _message_row(m: dict[str, Any]) -> dict[str, Any]:
    row = {name: m.get(name) for name in MESSAGE_TYPE.names}
    if row["tool_calls"] is not None:
        row["tool_calls"] = json.dumps(row["tool_calls"], ensure_ascii=False)
    return row


def rows_to_parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist(
        [
            {
                "id": r["id"],
                "messages": [_message_row(m) for m in r["messages"]],
                "tools": json.dumps(r["tools"], ensure_ascii=False) if r.get("tools") else None,
            }
            for r in rows
        ],
        schema=SCHEMA,
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def iter_rows(path: str | Path, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet file as dicts, ``batch_size`` rows at a time (memory bounded by one batch)."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()
