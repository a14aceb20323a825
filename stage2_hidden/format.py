"""The stage-2 shard format (the contract with stage 3): names, the Arrow schema and its metadata, opening a shard.

One record batch per row (conversation), so rows stream to disk as they are computed and a reader memory-maps any
row without touching the others. Columns (no compression, so bytes on disk per token are
``num_aux * H * 2`` hidden + 4 input id + 4 target id + 1 mask = ``3 * H * 2 + 9`` for 3 layers):

    id          string
    input_ids   list<int32>   [T]
    loss_mask   list<uint8>   [T]
    target_ids  list<int32>   [T]   argmax of the target's logits at t (its prediction of token t+1)
    hidden      large_binary  bf16 [T, W] (T * W * 2 bytes), W = num_aux * H, layers in layer_ids order;
                              or fp8 e4m3 [T, W] (T * W bytes) with
    hidden_scale large_binary fp32 [T, num_aux] (fp8 shards only): hidden[t, l*H:(l+1)*H] = q * scale[t, l]

fp8 (``hidden.storage_dtype=float8_e4m3``): per token and aux layer, scale = amax|h| / 448 (e4m3's largest
finite value) and q = round_e4m3(h / scale), so every value keeps 3 mantissa bits relative to its row's largest
(relative error <= 2^-4 for normal values) and the layers' very different magnitudes (the residual stream grows
with depth) each get their own range. Bytes per token: ``num_aux * H + num_aux * 4 + 9`` (an 8B target: 12,309,
half of bf16's 24,585). Stage 3 dequantises on the device.

Schema metadata: ``eagle3.format``, ``eagle3.hidden_dtype`` (``bfloat16`` | ``float8_e4m3``),
``eagle3.hidden_width``, ``eagle3.layer_ids``; a reader refuses a format or dtype it does not know.
A folder holds ``shard-NNNNN.arrow`` files, ``manifest.json`` (``format_version``, shapes, shard list with sha256,
``complete: true``), ``vocab.safetensors`` and ``.parts/`` (each shard's own record, written as it completes).

Integrity. A shard's record ``.parts/<name>.json`` holds ``file, rows, tokens, loss_tokens, bytes, sha256`` (of the
whole file, as in the manifest) and per-row sums: ``row_offsets`` [rows + 1] (row b's bytes are
``[row_offsets[b], row_offsets[b+1])``: its IPC message, metadata and body; row 0's range also holds the magic and
schema), ``row_sha256`` [rows] and ``tail_sha256`` (``[row_offsets[-1], bytes)``: the footer). The ranges tile the
file, so a reader can check each row as it first reads it: the cost is proportional to the bytes it reads anyway
(sha256 runs at ~1.7 GB/s per core and releases the GIL), not a pass over TBs before training. The manifest's sha256
must equal the record's (an edited manifest is refused); a record without row sums (shards written before they
existed) or a folder copied without ``.parts`` is checked a whole shard at a time, on its first read. The shard
files themselves are unchanged by this, so ``FORMAT_VERSION`` stays 1 and either reader reads either folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

FORMAT_VERSION = "eagle3-hidden/1"
PARTS = ".parts"
MANIFEST = "manifest.json"
HIDDEN_ITEMSIZE = {"bfloat16": 2, "float8_e4m3": 1}  # storage dtype -> bytes per stored hidden value
FP8_MAX = 448.0                                      # largest finite float8_e4m3fn


def check_storage_dtype(dtype: str, where: str = "hidden.storage_dtype") -> str:
    if dtype not in HIDDEN_ITEMSIZE:
        raise ValueError(f"{where}: unknown hidden storage dtype {dtype!r}; known: {sorted(HIDDEN_ITEMSIZE)}")
    return dtype


def bytes_per_token(width: int, num_aux: int, dtype: str) -> int:
    """Shard bytes per token (no compression): hidden, fp8 scales, input id + target id (int32) + mask (uint8)."""
    scales = 4 * num_aux if dtype == "float8_e4m3" else 0
    return width * HIDDEN_ITEMSIZE[dtype] + scales + 9


def quantize_fp8(hidden_TW, num_aux: int):
    """bf16/fp32 [T, W] -> (float8_e4m3fn [T, W], fp32 scales [T, num_aux]), one scale per token and aux layer.
    Runs wherever the tensor is (stage 2 quantises on the GPU, before the device->host copy)."""
    import torch

    T, W = hidden_TW.shape
    x_TLH = hidden_TW.float().view(T, num_aux, W // num_aux)
    scale_TL = (x_TLH.abs().amax(-1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # all-zero rows: q = 0
    q_TLH = (x_TLH / scale_TL[..., None]).to(torch.float8_e4m3fn)
    return q_TLH.view(T, W), scale_TL


def dequantize_fp8(q_TW, scale_TL, dtype=None):
    """Inverse of `quantize_fp8` for any leading shape: q [..., W], scale [..., num_aux] -> [..., W] in `dtype`
    (default bfloat16)."""
    import torch

    L = scale_TL.shape[-1]
    x = q_TW.float().unflatten(-1, (L, q_TW.shape[-1] // L)) * scale_TL.float()[..., None]
    return x.flatten(-2).to(dtype or torch.bfloat16)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def make_schema(width: int, layer_ids: list[int], dtype: str = "bfloat16") -> pa.Schema:
    check_storage_dtype(dtype)
    fields = [pa.field("id", pa.string()), pa.field("input_ids", pa.list_(pa.int32())),
              pa.field("loss_mask", pa.list_(pa.uint8())), pa.field("target_ids", pa.list_(pa.int32())),
              pa.field("hidden", pa.large_binary())]
    if dtype == "float8_e4m3":
        fields.append(pa.field("hidden_scale", pa.large_binary()))
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
    check_storage_dtype(meta.get(b"eagle3.hidden_dtype", b"").decode(), f"{path}: schema metadata eagle3.hidden_dtype")
    return reader


# ---- integrity: each shard's own record and the checks made against it ----

REMEDY = ("re-run stage 2 for it: the same stage-2 command re-hashes the shards it keeps, rewrites the damaged ones "
          "and writes a new manifest")


class ShardIntegrityError(ValueError):
    """A shard's bytes, its own record (``.parts/<name>.json``) and the manifest disagree: it was damaged after stage
    2 wrote it, or the manifest was edited. ``path`` is the shard file, ``problem`` what is wrong; the message ends
    with what to do."""

    def __init__(self, path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}; {REMEDY}")


def record_path(folder, name: str) -> Path:
    return Path(folder) / PARTS / f"{name}.json"


def read_record(folder, name: str) -> dict | None:
    """The record stage 2 wrote for shard ``name``, None if there is none; ``ValueError`` naming an unparsable one."""
    path = record_path(folder, name)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a readable shard record ({e})") from e
    if not isinstance(record, dict) or not {"bytes", "sha256"} <= record.keys():
        raise ValueError(f"{path}: not a shard record (needs bytes and sha256)")
    return record


def mapped_bytes(path) -> memoryview:
    """The whole file as a read-only memoryview of a memory map (no copy; pages are read as they are hashed)."""
    return memoryview(pa.memory_map(str(path), "r").read_buffer())


def record_blocks(record: dict | None, size: int) -> list[tuple[str, int, int, str | None]]:
    """(what, start, end, sha256) tiling a file of ``size`` bytes: the record's rows and footer, or, with no per-row
    sums, the whole file unchecked here (its sha256 is compared as a whole). ``ValueError`` if the offsets do not
    tile the file."""
    if record is None or "row_sha256" not in record:
        return [("the file", 0, size, None)]
    offsets, sums = record["row_offsets"], record["row_sha256"]
    if (len(offsets) != len(sums) + 1 or offsets[0] != 0 or offsets[-1] > size
            or any(a > b for a, b in zip(offsets, offsets[1:]))):
        raise ValueError(f"row offsets of {len(offsets)} entries do not tile a file of {size} bytes "
                         f"with {len(sums)} rows")
    blocks = [(f"row {b}", offsets[b], offsets[b + 1], sums[b]) for b in range(len(sums))]
    return blocks + [("the footer", offsets[-1], size, record["tail_sha256"])]


def block_ok(data: memoryview, start: int, end: int, sha256: str) -> bool:
    return hashlib.sha256(data[start:end]).hexdigest() == sha256


def shard_problem(path, record: dict | None, manifest_sha256: str | None = None) -> str | None:
    """What is wrong with a whole shard, or None: its size and every sha256 it has (the file's against its record
    and the manifest, each row's and the footer's against the record), in one pass over the mapped file."""
    data = mapped_bytes(path)
    if record is not None and len(data) != record["bytes"]:
        return f"{len(data)} bytes, its record says {record['bytes']} (truncated?)"
    try:
        blocks = record_blocks(record, len(data))
    except ValueError as e:
        return f"its record {record_path(Path(path).parent, Path(path).name)}: {e}"
    whole = hashlib.sha256()
    for what, start, end, want in blocks:
        whole.update(data[start:end])
        if want is not None and not block_ok(data, start, end, want):
            return f"sha256 mismatch in {what} (bytes {start}..{end})"
    digest = whole.hexdigest()
    for where, want in (("its record", record and record["sha256"]), ("the manifest", manifest_sha256)):
        if want is not None and digest != want:
            return f"sha256 mismatch: the file hashes to {digest[:16]}..., {where} says {want[:16]}..."
    return None
