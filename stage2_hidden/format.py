"""The stage-2 shard format (the contract with stage 3): names, the Arrow schema and its metadata, opening a shard.

One record batch per row (conversation), so rows stream to disk as they are computed and a reader memory-maps any
row without touching the others. Columns (no compression, so bytes on disk per token are
``num_aux * H * 2`` hidden + 4 input id + 4 target id + 1 mask = ``3 * H * 2 + 9`` for 3 layers):

    id          string
    input_ids   list<int32>   [T]
    loss_mask   list<uint8>   [T]
    target_ids  list<int32>   [T]   argmax of the target's logits at t (its prediction of token t+1)
    hidden      large_binary  T * W * 2 bytes: bf16 [T, W], W = num_aux * H, layers in layer_ids order

Schema metadata: ``eagle3.format``, ``eagle3.hidden_dtype``, ``eagle3.hidden_width``, ``eagle3.layer_ids``.
A folder holds ``shard-NNNNN.arrow`` files, ``manifest.json`` (``format_version``, shapes, shard list with sha256,
``complete: true``), ``vocab.safetensors`` and ``.parts/`` (per-shard facts written as shards complete).
"""
from __future__ import annotations

import json

import pyarrow as pa

FORMAT_VERSION = "eagle3-hidden/1"
PARTS = ".parts"
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def make_schema(width: int, layer_ids: list[int], dtype: str = "bfloat16") -> pa.Schema:
    fields = [pa.field("id", pa.string()), pa.field("input_ids", pa.list_(pa.int32())),
              pa.field("loss_mask", pa.list_(pa.uint8())), pa.field("target_ids", pa.list_(pa.int32())),
              pa.field("hidden", pa.large_binary())]
    meta = {"eagle3.format": FORMAT_VERSION, "eagle3.hidden_dtype": dtype,
            "eagle3.hidden_width": str(width), "eagle3.layer_ids": json.dumps(list(layer_ids))}
    return pa.schema(fields, metadata=meta)


def open_shard(path) -> pa.RecordBatchFileReader:
    """Memory-mapped Arrow IPC file reader; ``ValueError`` naming the file if it is not a whole shard."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"{path}: not a readable shard ({e})") from e
    meta = reader.schema.metadata or {}
    if meta.get(b"eagle3.format", b"").decode() != FORMAT_VERSION:
        raise ValueError(f"{path}: not an {FORMAT_VERSION} shard")
    return reader
