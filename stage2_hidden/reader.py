"""Zero-copy reader of stage-2 shards (the contract with stage 3).

``ShardDataset(dir)`` memory-maps every shard listed in ``manifest.json``; ``ds[i]`` returns torch
tensors that view the mapped file (no copy; read-only memory, so do not write into them). Any shard that
is missing, truncated, of the wrong size or schema raises ``ValueError`` naming the file; ``verify()``
re-hashes every shard against the manifest's sha256.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from common.files import sha256_file

from .format import FORMAT_VERSION, HIDDEN_ITEMSIZE, MANIFEST, check_storage_dtype, open_shard


def _torch_view(arr: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # the mapped memory is read-only; torch warns about that
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _binary_view(column, nbytes: int, where: str) -> np.ndarray:
    """The bytes of a one-row large_binary column, zero-copy; ValueError naming the row if the size is off."""
    start, end = np.frombuffer(column.buffers()[1], dtype=np.int64)[:2]
    raw = np.frombuffer(column.buffers()[2], dtype=np.uint8)[start:end]
    if raw.nbytes != nbytes:
        raise ValueError(f"{where} has {raw.nbytes} bytes, expected {nbytes}")
    return raw


class ShardDataset:
    def __init__(self, path, verify: bool = False):
        self.dir = Path(path)
        mpath = self.dir / MANIFEST
        if not mpath.exists():
            raise ValueError(f"{mpath}: missing (stage 2 did not finish)")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION or not self.manifest.get("complete"):
            raise ValueError(f"{mpath}: not a complete {FORMAT_VERSION} manifest")
        self.num_aux = int(self.manifest["num_aux_layers"])
        self.width = self.num_aux * int(self.manifest["hidden_size"])
        self.storage = check_storage_dtype(self.manifest.get("dtype", "bfloat16"), f"{mpath}: dtype")
        self.itemsize = HIDDEN_ITEMSIZE[self.storage]
        self._readers, index, tokens = [], [], []
        for s, entry in enumerate(self.manifest["shards"]):
            reader = self._open(entry)
            self._readers.append(reader)
            for b in range(reader.num_record_batches):
                index.append((s, b))
                tokens.append(len(reader.get_batch(b).column("input_ids").values))
        self._index = index
        self._tokens = np.asarray(tokens, dtype=np.int64)
        if verify:
            self.verify()

    def _open(self, entry) -> pa.RecordBatchFileReader:
        path = self.dir / entry["file"]
        if not path.exists():
            raise ValueError(f"{path}: shard missing")
        if path.stat().st_size != entry["bytes"]:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
        reader = open_shard(path)
        width = int(reader.schema.metadata[b"eagle3.hidden_width"])
        dtype = reader.schema.metadata[b"eagle3.hidden_dtype"].decode()
        if reader.num_record_batches != entry["rows"] or width != self.width or dtype != self.storage:
            raise ValueError(f"{path}: {reader.num_record_batches} rows of width {width} in {dtype}, manifest says "
                             f"{entry['rows']} rows of width {self.width} in {self.storage}")
        return reader

    def __len__(self) -> int:
        return len(self._index)

    def num_tokens(self, i: int) -> int:
        return int(self._tokens[i])

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N] tokens per row."""
        return self._tokens

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        s, b = self._index[i]
        batch = self._readers[s].get_batch(b)
        T = int(self._tokens[i])
        where = f"{self.dir / self.manifest['shards'][s]['file']}: row {b}"
        raw = _binary_view(batch.column("hidden"), T * self.width * self.itemsize, f"{where} hidden")
        row = {
            "id": batch.column("id")[0].as_py(),
            "input_ids": _torch_view(batch.column("input_ids").values.to_numpy(zero_copy_only=True)),
            "loss_mask": _torch_view(batch.column("loss_mask").values.to_numpy(zero_copy_only=True)),
            "target_ids": _torch_view(batch.column("target_ids").values.to_numpy(zero_copy_only=True)),
        }
        if self.storage == "bfloat16":
            row["hidden"] = _torch_view(raw.view(np.int16)).view(torch.bfloat16).view(T, self.width)
        else:  # fp8: the stored bytes and their scales; stage 3 dequantises on the device (format.dequantize_fp8)
            scale = _binary_view(batch.column("hidden_scale"), T * self.num_aux * 4, f"{where} hidden_scale")
            row["hidden"] = _torch_view(raw).view(torch.float8_e4m3fn).view(T, self.width)
            row["hidden_scale"] = _torch_view(scale.view(np.float32)).view(T, self.num_aux)
        return row

    def verify(self) -> None:
        """sha256 of every shard against the manifest; ``ValueError`` naming the first bad file."""
        for entry in self.manifest["shards"]:
            path = self.dir / entry["file"]
            if sha256_file(path) != entry["sha256"]:
                raise ValueError(f"{path}: sha256 mismatch (corrupted shard)")
