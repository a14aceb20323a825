"""Zero-copy reader of stage-2 shards (the contract with stage 3), with integrity checks cheap enough to leave on.

``ShardDataset(dir)`` memory-maps every shard listed in ``manifest.json``; ``ds[i]`` returns torch
tensors that view the mapped file (no copy; read-only memory, so do not write into them). Any shard that
is missing, truncated, of the wrong size or schema raises ``ValueError`` naming the file.

Integrity (``check_reads=True``, the default; ``format.py`` describes the records): at open, each manifest entry
must equal the shard's own record and the footer its sha256; ``check_row(i)`` then checks row i's bytes against its
sha256 the first time it is asked (stage 3's loader asks for every row it collates, in its background thread), or,
for shards without per-row sums, the whole shard once. A mismatch is a ``ShardIntegrityError`` naming the shard
file. ``verify()`` re-hashes every shard whole (``make inspect``).
"""
from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from common.logs import get_logger
from stage1_sample.json_files import InputFileError

from .format import (FORMAT_VERSION, HIDDEN_ITEMSIZE, MANIFEST, ShardIntegrityError, block_ok, check_storage_dtype,
                     mapped_bytes, open_shard, read_record, record_blocks, record_path, shard_problem)

log = get_logger("stage2")


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


class RowChecks:
    """The integrity checks of one open shard set: manifest vs records and footers at construction, then each row
    (or each shard without per-row sums) once, on first read. Thread-safe: the loader's background thread and the
    main thread (validation) may both read."""

    def __init__(self, folder: Path, entries: list[dict], row_counts: list[int]):
        self.paths = [folder / e["file"] for e in entries]
        self.records = [read_record(folder, e["file"]) for e in entries]
        self._manifest_sha = [e["sha256"] for e in entries]
        self._data: list[memoryview | None] = [None] * len(entries)
        self._row_ok = [np.zeros(n, dtype=bool) for n in row_counts]
        self._whole_ok = [False] * len(entries)
        self._locks = [threading.Lock() for _ in entries]
        for s, (entry, record) in enumerate(zip(entries, self.records)):
            if record is not None:
                self._check_record(s, entry, record)
        whole = [p.name for p, r in zip(self.paths, self.records) if r is None or "row_sha256" not in r]
        if whole:
            log.warning(f"{folder}: {len(whole)} of {len(entries)} shards ({whole[0]}, ...) have no per-row "
                        f"sha256 in {folder / '.parts'} (written before per-row sums, or copied without .parts): "
                        "each is hashed whole on its first read")

    def _bytes(self, s: int) -> memoryview:
        if self._data[s] is None:
            self._data[s] = mapped_bytes(self.paths[s])
        return self._data[s]

    def _check_record(self, s: int, entry: dict, record: dict) -> None:
        """The manifest entry against the shard's own record (an edited manifest), then the footer's sha256 (it
        locates every row; tiny)."""
        path, rpath = self.paths[s], record_path(self.paths[s].parent, self.paths[s].name)
        for key in ("sha256", "bytes", "rows", "tokens"):
            if key in record and entry.get(key) != record[key]:
                raise ShardIntegrityError(path, f"the manifest says {key} {entry.get(key)}, the shard's own record "
                                                f"{rpath} says {record[key]} (manifest edited or from another run)")
        if "row_sha256" not in record:
            return
        try:
            *_, (what, start, end, sha) = record_blocks(record, record["bytes"])
        except ValueError as e:
            raise ShardIntegrityError(path, f"its record {rpath}: {e}") from e
        if not block_ok(self._bytes(s), start, end, sha):
            raise ShardIntegrityError(path, f"sha256 mismatch in {what} (bytes {start}..{end})")

    def row(self, s: int, b: int) -> None:
        """Row b of shard s matches its sha256 (checked once); ``ShardIntegrityError`` naming the shard if not."""
        if self._row_ok[s][b]:
            return
        record = self.records[s]
        if record is None or "row_sha256" not in record:
            self._whole(s)
        else:
            start, end = record["row_offsets"][b], record["row_offsets"][b + 1]
            if not block_ok(self._bytes(s), start, end, record["row_sha256"][b]):
                raise ShardIntegrityError(self.paths[s], f"sha256 mismatch in row {b} (bytes {start}..{end})")
        self._row_ok[s][b] = True

    def _whole(self, s: int) -> None:
        with self._locks[s]:  # one hash per shard, whichever thread reads it first
            if self._whole_ok[s]:
                return
            problem = shard_problem(self.paths[s], self.records[s], self._manifest_sha[s])
            if problem is not None:
                raise ShardIntegrityError(self.paths[s], problem)
            self._whole_ok[s] = True


class ShardDataset:
    def __init__(self, path, verify: bool = False, check_reads: bool = True):
        """``verify``: re-hash every shard whole now (slow on TBs); ``check_reads``: the cheap checks of the module
        docstring (stage 3's ``train.advanced.verify_shards``); False skips them."""
        self.dir = Path(path)
        mpath = self.dir / MANIFEST
        if not self.dir.is_dir():
            raise InputFileError(self.dir, "no such folder of stage-2 shards: check the path, or run stage 2 "
                                           "(`make hidden`) to write them there")
        if not mpath.exists():
            raise InputFileError(mpath, "missing: stage 2 did not finish; re-run the same `make hidden` to resume it")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{mpath}: not valid JSON ({e}); stage 2 writes it atomically, so it was edited or "
                             "damaged: re-run stage 2 (the same command) to write it again") from e
        if (not isinstance(self.manifest, dict) or self.manifest.get("format_version") != FORMAT_VERSION
                or not self.manifest.get("complete")):
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
        self.checks = None
        if check_reads:
            self.checks = RowChecks(self.dir, self.manifest["shards"], [r.num_record_batches for r in self._readers])
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

    def check_row(self, i: int) -> None:
        """Row i's bytes match stage 2's sha256 (each row checked once; a no-op with ``check_reads=False``);
        ``ShardIntegrityError`` naming the shard file if not."""
        if self.checks is not None:
            self.checks.row(*self._index[i])

    def verify(self) -> None:
        """Every shard re-hashed whole against the manifest and its record; ``ShardIntegrityError`` naming the first
        bad file."""
        for entry in self.manifest["shards"]:
            path = self.dir / entry["file"]
            problem = shard_problem(path, read_record(self.dir, entry["file"]), entry["sha256"])
            if problem is not None:
                raise ShardIntegrityError(path, problem)
