"""Writing Arrow IPC shards of hidden states: the atomic shard writer, each shard's record and the manifest.

The format (columns, schema metadata, records and their per-row sha256) is ``format.py``.

A shard is written to ``.tmp-<name>`` in the same folder (hashed and flushed by helper threads while it
is written), fsynced and renamed to ``shard-NNNNN.arrow``; its record (rows, tokens, bytes, sha256 of the file and
of each row) then goes to ``.parts/<name>.json``. A file under the final name with its record is therefore
complete as written; a restarted run re-hashes it against the record before keeping it (``shard_info``) and
rewrites the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.files import atomic_write_text, fsync_dir
from common.logs import get_logger

from .format import (FORMAT_VERSION, HIDDEN_ITEMSIZE, MANIFEST, PARTS, read_record, record_path, shard_name,
                     shard_problem)

log = get_logger("stage2")


def _list_array(values: np.ndarray, pa_type) -> pa.Array:
    """One-row list<...> array over ``values`` without copying them."""
    offsets = pa.array(np.array([0, len(values)], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa_type))


def _np(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def hidden_bytes(hidden) -> np.ndarray:
    """Hidden [T, W] as stored (torch bf16 or float8_e4m3fn, fp32 scales; or a raw numpy view) -> flat uint8
    view, no copy."""
    if hasattr(hidden, "detach"):
        import torch
        views = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float32: torch.int32}
        if hidden.dtype not in views:
            raise ValueError(f"hidden must be bfloat16 or float8_e4m3fn (scales float32), got {hidden.dtype}")
        hidden = hidden.detach().contiguous().cpu().view(views[hidden.dtype]).numpy()
    return np.ascontiguousarray(hidden).reshape(-1).view(np.uint8)


def _binary(raw: np.ndarray) -> pa.Array:
    """One-row large_binary array over `raw` without copying it."""
    return pa.Array.from_buffers(pa.large_binary(), 1, [
        None, pa.py_buffer(np.array([0, raw.nbytes], dtype=np.int64)), pa.py_buffer(raw)])


class _Follower:
    """A helper thread that follows a file as it grows: ``step(start, end)`` runs on each new byte range.

    The writer ``publish``es the file's size after each append; ``finish(size)`` waits until ``step`` has
    covered ``size`` bytes (then runs ``last(size)``) and re-raises the helper's error, if any. Used to
    flush (``fdatasync``) while the next rows are written instead of after each row."""

    def __init__(self, step, last=None, min_bytes: int = 1):
        self._step, self._last, self._min = step, last, int(min_bytes)
        self._cond = threading.Condition()
        self._size, self._final, self._error, self._stopped = 0, None, None, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def publish(self, size: int) -> None:
        with self._cond:
            self._size = size
            self._cond.notify()

    def finish(self, size: int) -> None:
        with self._cond:
            self._size = self._final = size
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """End the thread without covering the rest (the file is being thrown away)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        done = 0
        try:
            while True:
                with self._cond:
                    while not self._stopped and self._final is None and self._size - done < self._min:
                        self._cond.wait()
                    if self._stopped:
                        return
                    size, final = self._size, self._final
                if size > done:
                    self._step(done, size)
                    done = size
                if final is not None and done >= final:
                    if self._last is not None:
                        self._last(final)
                    return
        except BaseException as e:  # re-raised by finish()
            self._error = e


_ROW_END = object()  # a mark in the hasher's queue: the bytes so far end a row


class _HashingSink:
    """File-like sink for Arrow's IPC writer (through ``pa.PythonFile``): each piece is queued, in order,
    for the hasher threads and appended to the file with ``os.write`` (no GIL). Arrow hands the record batch
    buffers over zero-copy, so the hidden states are hashed from the caller's memory while they are written
    (hashlib releases the GIL), not read back afterwards. A caller that reuses its memory must wait for
    ``after_hashed`` callbacks (or ``drain``).

    Two sha256 per byte, on two threads in a pipeline so they run at once (each ~1.7 GB/s on one core): the file
    hasher hashes the whole file (``sha``) and hands every piece, row mark and callback on to the row hasher, which
    hashes each row on its own. ``end_row()`` after each row closes that row's range; after ``close()``,
    ``row_offsets`` [rows + 1], ``row_sha256`` [rows] and ``tail_sha256`` (the bytes after the last row: the
    footer) are the record's per-row sums (``format.py``)."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos, self.closed, self.sha = 0, False, hashlib.sha256()
        self._row_sha = hashlib.sha256()
        self.row_offsets, self.row_sha256, self.tail_sha256 = [0], [], None
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()      # writer -> file hasher
        self._row_pieces: queue.SimpleQueue = queue.SimpleQueue()  # file hasher -> row hasher
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=loop, daemon=True) for loop in (self._file_loop, self._row_loop)]
        for thread in self._threads:
            thread.start()

    def write(self, data) -> int:
        piece = memoryview(data).cast("B")
        self._pieces.put(piece)
        done = 0
        while done < len(piece):  # one write() moves at most ~2 GiB
            done += os.write(self._fd, piece[done:])
        self.pos += len(piece)
        return len(piece)

    def end_row(self) -> None:
        """The bytes written since the previous ``end_row`` are one row: they get their own sha256."""
        self.row_offsets.append(self.pos)
        self._pieces.put(_ROW_END)

    def after_hashed(self, callback) -> None:
        """Run ``callback()`` (on the row hasher) once both hashers have hashed every piece written so far."""
        self._pieces.put(callback)

    def drain(self) -> None:
        done = threading.Event()
        self.after_hashed(done.set)
        done.wait()

    def _file_loop(self) -> None:
        """A piece goes on to the row hasher before it is hashed here (both hash it at once); a mark or callback
        goes on after every earlier piece is hashed here, so the row hasher meets it when both are done."""
        while (piece := self._pieces.get()) is not None:
            self._row_pieces.put(piece)
            if isinstance(piece, memoryview) and self._error is None:
                try:
                    self.sha.update(piece)
                except BaseException as e:  # re-raised by close()
                    self._error = self._error or e
        self._row_pieces.put(None)

    def _row_loop(self) -> None:
        while (piece := self._row_pieces.get()) is not None:
            try:
                if piece is _ROW_END:
                    self.row_sha256.append(self._row_sha.hexdigest())
                    self._row_sha = hashlib.sha256()
                elif callable(piece):
                    piece()
                elif self._error is None:
                    self._row_sha.update(piece)
            except BaseException as e:  # re-raised by close()
                self._error = self._error or e

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._pieces.put(None)
        for thread in self._threads:
            thread.join()
        self.tail_sha256 = self._row_sha.hexdigest()
        os.close(self._fd)
        if self._error is not None:
            raise self._error


class ShardWriter:
    """Writes one shard atomically; ``close()`` returns its manifest entry.

    Four threads per shard: the caller appends record batches (``os.write``, no GIL); two hashers update the
    file's and each row's sha256 from the same memory (``_HashingSink``); a flusher ``fdatasync``s the bytes as they
    come, so the disk works while the next rows are written and closing a shard waits for about one row.
    ``async_hash=False``: ``write_row`` returns once the row is hashed (the caller may reuse its memory);
    ``True``: it returns at once, and the caller keeps the memory unchanged until a callback given to
    ``after_hashed`` has run."""

    def __init__(self, out_dir: Path, index: int, schema: pa.Schema, flush_bytes: int = 8 << 20,
                 async_hash: bool = False):
        self.out_dir, self.name, self.schema = Path(out_dir), shard_name(index), schema
        self.width = int(schema.metadata[b"eagle3.hidden_width"])
        self.storage = schema.metadata[b"eagle3.hidden_dtype"].decode()
        self.itemsize = HIDDEN_ITEMSIZE[self.storage]
        self.num_aux = len(json.loads(schema.metadata[b"eagle3.layer_ids"]))
        self.tmp = self.out_dir / f".tmp-{self.name}"
        self.async_hash = async_hash
        self._sink = _HashingSink(self.tmp)
        self._writer = pa.ipc.new_file(pa.PythonFile(self._sink, mode="w"), schema)
        self._sync_fd = os.open(self.tmp, os.O_RDONLY)
        self._flusher = _Follower(lambda start, end: _fdatasync(self._sync_fd),
                                  last=lambda size: os.fsync(self._sync_fd), min_bytes=flush_bytes)
        self.rows = self.tokens = self.loss_tokens = 0

    def write_row(self, row_id: str, input_ids, loss_mask, target_ids, hidden, hidden_scale=None) -> None:
        """hidden: bf16 [T, W], or for fp8 shards float8_e4m3fn [T, W] with `hidden_scale` fp32 [T, num_aux]."""
        ids, mask, tgt = _np(input_ids, np.int32), _np(loss_mask, np.uint8), _np(target_ids, np.int32)
        raw = hidden_bytes(hidden)
        T = len(ids)
        if not (len(mask) == len(tgt) == T and raw.nbytes == T * self.width * self.itemsize):
            raise ValueError(f"row {row_id}: lengths disagree (ids {T}, mask {len(mask)}, targets {len(tgt)}, "
                             f"hidden {raw.nbytes} bytes, expected {T * self.width * self.itemsize})")
        columns = [pa.array([row_id], pa.string()), _list_array(ids, pa.int32()), _list_array(mask, pa.uint8()),
                   _list_array(tgt, pa.int32()), _binary(raw)]
        if self.storage == "float8_e4m3":
            scale = hidden_bytes(hidden_scale) if hidden_scale is not None else np.zeros(0, np.uint8)
            if scale.nbytes != T * self.num_aux * 4:
                raise ValueError(f"row {row_id}: fp8 shard needs hidden_scale fp32 [{T}, {self.num_aux}], got "
                                 f"{scale.nbytes} bytes")
            columns.append(_binary(scale))
        batch = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        self._writer.write_batch(batch)
        self._sink.end_row()
        self._flusher.publish(self._sink.pos)
        if not self.async_hash:
            self._sink.drain()
        self.rows += 1
        self.tokens += T
        self.loss_tokens += int(mask.sum())

    def after_hashed(self, callback) -> None:
        self._sink.after_hashed(callback)

    def _finish_tail(self) -> str:
        """Footer written and file closed: wait for the hash and the final fsync."""
        try:
            self._writer.close()
        finally:
            try:
                self._sink.close()
            finally:
                try:
                    self._flusher.finish(self._sink.pos)
                finally:
                    self._close_fd()
        return self._sink.sha.hexdigest()

    def _close_fd(self) -> None:
        if self._sync_fd >= 0:
            fd, self._sync_fd = self._sync_fd, -1
            os.close(fd)

    def close(self) -> dict[str, Any]:
        sha = self._finish_tail()
        final = self.out_dir / self.name
        os.replace(self.tmp, final)
        fsync_dir(self.out_dir)
        sink = self._sink
        info = {"file": self.name, "rows": self.rows, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "bytes": final.stat().st_size, "sha256": sha, "row_offsets": sink.row_offsets,
                "row_sha256": sink.row_sha256, "tail_sha256": sink.tail_sha256}
        assert len(sink.row_sha256) == self.rows and sink.row_offsets[-1] <= info["bytes"]
        (self.out_dir / PARTS).mkdir(exist_ok=True)
        atomic_write_text(record_path(self.out_dir, self.name), json.dumps(info))
        return info

    def abort(self) -> None:
        """Stop the helpers (queued callbacks still run) and delete the temp file; never raises."""
        for step in (self._writer.close, self._sink.close, self._flusher.stop, self._close_fd):
            try:
                step()
            except Exception:
                pass
        self.tmp.unlink(missing_ok=True)


_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def shard_info(out_dir: Path, index: int, verify: bool = False) -> dict[str, Any] | None:
    """The record of a complete shard, or None when it must be (re)written: no final file; no record or an unreadable
    one (killed between the rename and the record: nothing to check the file against); with ``verify``, a file that
    no longer matches its record (re-hashed whole: a flipped byte is caught). A damaged shard is deleted with a
    warning naming it, so the caller rewrites it."""
    out_dir, name = Path(out_dir), shard_name(index)
    path = out_dir / name
    if not path.exists():
        return None
    try:
        record = read_record(out_dir, name)
    except ValueError as e:
        record, problem = None, str(e)
    else:
        problem = None if record is not None else "no record (killed before it was written)"
        if record is not None and verify:
            problem = shard_problem(path, record)
    if problem is None:
        return record
    log.warning(f"{path}: {problem}; rewriting it")
    record_path(out_dir, name).unlink(missing_ok=True)  # the record first: a kill in between leaves "no record"
    path.unlink()
    return None


def write_manifest(out_dir: Path, shards: list[dict], fields: dict[str, Any], elapsed_s: float | None = None) -> dict:
    """``manifest.json`` with totals; ``created_at`` / ``elapsed_s`` are the only timing fields."""
    tokens = sum(s["tokens"] for s in shards)
    nbytes = sum(s["bytes"] for s in shards)
    manifest = {"format_version": FORMAT_VERSION, **fields,
                "num_rows": sum(s["rows"] for s in shards), "num_tokens": tokens,
                "num_loss_tokens": sum(s.get("loss_tokens", 0) for s in shards),
                "bytes": nbytes, "bytes_per_token": nbytes / max(tokens, 1),
                "shards": [{k: s[k] for k in ("file", "rows", "tokens", "bytes", "sha256")} for s in shards],
                "complete": True, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": elapsed_s}
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest
