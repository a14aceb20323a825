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
``complete: true``), ``vocab.safetensors`` and ``.parts/`` (per-shard facts written as shards complete).
"""
from __future__ import annotations

import json

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
