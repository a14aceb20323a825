"""Packed, deterministic, rank-strided, resumable batches over stage 2's shards.

Packing: conversations (shard rows) are taken in a seeded per-epoch shuffle and placed first-fit into rows of
`max_tokens` tokens (a small window of open rows, so the result depends only on the order); a conversation longer
than `max_tokens` is truncated to its first `max_tokens` tokens and fills a row alone. Inside a packed row
`position_ids` restart at 0 for every conversation and `doc_ids` number the conversations (0, 1, ...; -1 = padding),
which is what the TTT attention uses to keep attention inside a conversation.

Order: the packed rows of epoch e are a pure function of (seed, e, the row lengths, max_tokens). Micro-batch m of
rank r (world W, B rows per micro-batch) holds global rows (m*B + b)*W + r for b < B, i.e. rank r takes rows
r, r+W, r+2W, ... So one process with grad_accum=2 sees exactly the rows two processes with grad_accum=1 see, and
the global batch of a step does not depend on W. The tail of an epoch that does not fill every rank is dropped.
The state (version, world size, epoch, micro-step) goes into the checkpoint; resuming continues at the next
micro-batch, identically.

Integrity: `collate` asks a source that can check its bytes (stage 2's ShardDataset, `check_row`) to check each row
it reads (under sequence parallelism only the rank holding slice 0 of the features checks), so with the Prefetcher the sha256 of a row runs in the background thread, once per row, on bytes it is
about to copy anyway; a damaged shard stops training with a ShardIntegrityError naming it
(`train.advanced.verify_shards`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import queue
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from stage3_train.ttt import PackedBatch

STATE_VERSION = 1
OPEN_ROWS = 8  # first-fit looks at this many open rows; more gives fuller rows, same determinism


class RowSource(Protocol):
    """What the loader needs from stage 2's ShardDataset (tests may pass any object with these). A source may also
    have `check_row(i)` (raise if row i's bytes are damaged); `collate` calls it before reading each row."""

    def __len__(self) -> int: ...
    def num_tokens(self, i: int) -> int: ...
    def __getitem__(self, i: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Segment:
    row: int     # index of the conversation in the source
    length: int  # tokens taken from it (its length, or max_tokens when truncated)


def _unit_hash(text: str) -> float:
    """A stable hash of `text` mapped to [0, 1) (sha256, not Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def split_rows(ids: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Train / validation indices by a hash of each conversation id: stable when shards are added or reordered.

    A row is held out when hash(id) < val_fraction. With val_fraction > 0 and at least 2 rows, the row with the
    smallest hash is held out even if none falls under the threshold (tiny data sets still get a validation row).
    """
    hashes = [_unit_hash(i) for i in ids]
    val = [i for i, h in enumerate(hashes) if h < val_fraction]
    if val_fraction > 0 and not val and len(ids) >= 2:
        val = [min(range(len(ids)), key=hashes.__getitem__)]
    if len(val) == len(ids) and ids:
        raise ValueError(f"train.val_fraction={val_fraction} leaves no training rows out of {len(ids)}")
    held = set(val)
    return [i for i in range(len(ids)) if i not in held], val


def pack(order: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[Segment]]:
    """First-fit packing of conversations, in `order`, into rows of at most `max_tokens` tokens.

    Keeps up to OPEN_ROWS partially filled rows; a conversation goes into the first open row with room, else it
    opens a new row (closing the fullest open row when there are too many). Conversations with < 2 tokens carry
    no label and are skipped. Rows come out in the order they were opened.
    """
    rows: list[list[Segment]] = []
    open_rows: list[int] = []   # indices into rows
    used: dict[int, int] = {}   # tokens used per open row
    for r in order:
        n = min(int(lengths[r]), max_tokens)
        if n < 2:
            continue
        slot = next((j for j in open_rows if used[j] + n <= max_tokens), None)
        if slot is None:
            if len(open_rows) == OPEN_ROWS:
                fullest = max(open_rows, key=lambda j: (used[j], -j))
                open_rows.remove(fullest)
            slot = len(rows)
            rows.append([])
            open_rows.append(slot)
            used[slot] = 0
        rows[slot].append(Segment(r, n))
        used[slot] += n
        if used[slot] == max_tokens:
            open_rows.remove(slot)
    return rows


@dataclass
class MicroBatch:
    """One rank's collated micro-batch on the host (or a device after `.to`): padded [B, T] tensors plus bookkeeping.

    hidden is [B, T, W] in the shard dtype, or with sequence parallelism only this rank's slice [B, ceil(T/N), W]
    (see `collate(hidden_part=...)`). conversation_ids names the conversations of each row (error messages);
    sq_tokens = sum of squared conversation lengths (attention FLOPs for MFU); epoch / micro_step say where in the
    data order it came from (error messages)."""
    input_ids: torch.Tensor     # [B, T] long
    target_ids: torch.Tensor    # [B, T] long
    position_ids: torch.Tensor  # [B, T] long, restarting at 0 per conversation
    loss_mask: torch.Tensor     # [B, T] bool
    doc_ids: torch.Tensor       # [B, T] long, -1 = padding
    hidden: torch.Tensor        # [B, T or ceil(T/N), W] bf16, or float8_e4m3fn for fp8 shards
    conversation_ids: list[list[str]]
    sq_tokens: int
    epoch: int = 0
    micro_step: int = 0
    hidden_scale: torch.Tensor | None = None  # fp8 shards: fp32 [B, T or ceil(T/N), num_aux] (stage2_hidden.format)

    TENSORS = ("input_ids", "target_ids", "position_ids", "loss_mask", "doc_ids", "hidden", "hidden_scale")

    def _map(self, fn) -> "MicroBatch":
        return dataclasses.replace(self, **{k: fn(getattr(self, k)) for k in self.TENSORS
                                            if getattr(self, k) is not None})

    def device_hidden(self, device: torch.device | str) -> torch.Tensor:
        """`hidden` on `device` in bf16: fp8 shards travel as 1 byte per value and are dequantised there
        (x = q * scale per token and aux layer), so host memory and the copy stay half the size."""
        hidden = self.hidden.to(device, non_blocking=True)
        if self.hidden_scale is None:
            return hidden
        from stage2_hidden.format import dequantize_fp8

        return dequantize_fp8(hidden, self.hidden_scale.to(device, non_blocking=True))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MicroBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "MicroBatch":
        return self._map(lambda t: t.pin_memory())

    def packed(self, device: torch.device | str) -> "PackedBatch":
        """The ttt.PackedBatch of whole rows on `device` (hidden stays in the shard dtype)."""
        from stage3_train.ttt import PackedBatch

        keys = ("input_ids", "target_ids", "loss_mask", "position_ids", "doc_ids")
        return PackedBatch(**{k: getattr(self, k).to(device, non_blocking=True) for k in keys},
                           hidden=self.device_hidden(device))


def collate(source: RowSource, rows: Sequence[Sequence[Segment]], pad_multiple: int,
            hidden_part: tuple[int, int] | None = None) -> MicroBatch:
    """Materialise packed rows as a MicroBatch of padded [B, T] tensors (T = longest row rounded up to pad_multiple).

    An empty row (a rank with nothing left in a validation pass) is all padding.
    hidden_part (i, n): sequence parallelism: `hidden` holds only slice i of n of the features, [B, ceil(T/n), 3H]
    = tokens [i*L, (i+1)*L) (zeros past T), the slice `sequence_parallel.shard_batch` keeps; the rest as above.
    """
    longest = max([sum(s.length for s in row) for row in rows] + [1])
    T = -(-longest // pad_multiple) * pad_multiple
    B = len(rows)
    part, parts = hidden_part or (0, 1)
    L = -(-T // parts)
    h_lo, h_hi = part * L, (part + 1) * L  # token window of the hidden features kept
    ints = {k: torch.zeros(B, T, dtype=torch.long) for k in ("input_ids", "target_ids", "position_ids")}
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    hidden_BLW = scale_BLn = None
    ids: list[list[str]] = []
    sq_tokens = 0  # sum of squared conversation lengths: attention FLOPs for MFU
    # sequence parallelism: the ranks of a group collate the same rows, each keeping a slice of the hidden features;
    # slice 0's rank checks the whole row for all of them (a mismatch stops it, and so the group), so no rank pages
    # in and hashes the bytes of slices it never reads
    check_row = getattr(source, "check_row", None) if part == 0 else None
    for b, row in enumerate(rows):
        ids.append([])
        t = 0
        for d, seg in enumerate(row):
            if check_row is not None:
                check_row(seg.row)
            item = source[seg.row]
            n, span = seg.length, slice(t, t + seg.length)
            ints["input_ids"][b, span] = item["input_ids"][:n].long()
            ints["target_ids"][b, span] = item["target_ids"][:n].long()
            loss_mask[b, span] = item["loss_mask"][:n].bool()
            ints["position_ids"][b, span] = torch.arange(n)
            doc_ids[b, span] = d
            h_TW = item["hidden"][:n]
            if hidden_BLW is None:
                hidden_BLW = torch.zeros(B, L, h_TW.shape[-1], dtype=h_TW.dtype)
                if "hidden_scale" in item:  # fp8 shards (padding: q = 0, scale 0)
                    scale_BLn = torch.zeros(B, L, item["hidden_scale"].shape[-1], dtype=torch.float32)
            lo, hi = max(t, h_lo), min(t + n, h_hi)
            if lo < hi:
                hidden_BLW[b, lo - h_lo:hi - h_lo] = h_TW[lo - t:hi - t]
                if scale_BLn is not None:
                    scale_BLn[b, lo - h_lo:hi - h_lo] = item["hidden_scale"][lo - t:hi - t]
            ids[b].append(str(item["id"]))
            sq_tokens += n * n
            t += n
    if hidden_BLW is None:  # only empty rows: width and dtype from any row of the source
        first = source[0]
        hidden_BLW = torch.zeros(B, L, first["hidden"].shape[-1], dtype=first["hidden"].dtype)
        if "hidden_scale" in first:
            scale_BLn = torch.zeros(B, L, first["hidden_scale"].shape[-1], dtype=torch.float32)
    return MicroBatch(**ints, loss_mask=loss_mask, doc_ids=doc_ids, hidden=hidden_BLW, conversation_ids=ids,
                      sq_tokens=sq_tokens, hidden_scale=scale_BLn)


class PackedLoader:
    """Endless iterator of this rank's micro-batches over `indices` of `source` (see the module docstring)."""

    def __init__(self, source: RowSource, indices: Sequence[int], *, max_tokens: int, batch_rows: int,
                 rank: int, world_size: int, seed: int, pad_multiple: int = 64, shuffle: bool = True,
                 hidden_part: tuple[int, int] | None = None):
        self.source, self.indices = source, list(indices)
        self.max_tokens, self.batch_rows, self.pad_multiple = max_tokens, batch_rows, pad_multiple
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.hidden_part = hidden_part  # sequence parallelism: (sp_rank, sp_size), see collate
        self.lengths = {i: source.num_tokens(i) for i in self.indices}
        self.epoch, self.micro_step = 0, 0
        self._plan_epoch, self._plan = -1, []

    def plan(self, epoch: int) -> list[list[Segment]]:
        """The packed rows of `epoch` (all ranks compute the same list)."""
        if epoch != self._plan_epoch:
            order = list(self.indices)
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._plan, self._plan_epoch = pack(order, self.lengths, self.max_tokens), epoch
        return self._plan

    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch per rank (the tail that does not fill all ranks is dropped)."""
        n = len(self.plan(self.epoch)) // (self.world_size * self.batch_rows)
        if n == 0:
            raise ValueError(f"{len(self.plan(self.epoch))} packed rows of {self.max_tokens} tokens from "
                             f"{len(self.indices)} conversations: fewer than world_size*batch_rows = "
                             f"{self.world_size * self.batch_rows}; add data or lower train.max_tokens/batch_rows")
        return n

    def rows_of(self, micro_step: int) -> list[list[Segment]]:
        plan, W, B = self.plan(self.epoch), self.world_size, self.batch_rows
        return [plan[(micro_step * B + b) * W + self.rank] for b in range(B)]

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        if self.micro_step >= self.steps_per_epoch():
            self.epoch, self.micro_step = self.epoch + 1, 0
        batch = collate(self.source, self.rows_of(self.micro_step), self.pad_multiple, self.hidden_part)
        batch.epoch, batch.micro_step = self.epoch, self.micro_step
        self.micro_step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "world_size": self.world_size, "batch_rows": self.batch_rows,
                "seed": self.seed, "max_tokens": self.max_tokens, "num_rows": len(self.indices),
                "epoch": self.epoch, "micro_step": self.micro_step}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue where `sd` stopped. A different world size works when the consumed rows divide evenly."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {sd.get('version')} != {STATE_VERSION}")
        now = {"seed": self.seed, "max_tokens": self.max_tokens, "num_rows": len(self.indices)}
        for key, value in now.items():
            if sd[key] != value:
                raise ValueError(f"cannot resume the data order: checkpoint has {key}={sd[key]}, now {value}")
        consumed = sd["micro_step"] * sd["world_size"] * sd["batch_rows"]  # global rows of this epoch
        per_step = self.world_size * self.batch_rows
        if consumed % per_step:
            raise ValueError(f"cannot resume: {consumed} rows consumed in epoch {sd['epoch']} do not split into "
                             f"micro-batches of world_size*batch_rows = {per_step}")
        self.epoch, self.micro_step = sd["epoch"], consumed // per_step


class Prefetcher:
    """Collates the next micro-batches of a PackedLoader in a background thread (into pinned memory for CUDA)
    while the device computes. `state_dict()` is the loader state after the last batch *handed out*, so a
    checkpoint never skips the batches still waiting in the queue."""

    def __init__(self, loader: PackedLoader, depth: int = 2, pin_memory: bool = False):
        self.loader, self.pin_memory = loader, pin_memory
        self._state = loader.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="stage3-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self.loader)
                if self.pin_memory:
                    batch = batch.pin_memory()
                self._queue.put((batch, self.loader.state_dict()))  # the loader state right after this batch
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a put() on a full queue
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


def eval_batches(source: RowSource, indices: Sequence[int], *, max_tokens: int, batch_rows: int, rank: int,
                 world_size: int, pad_multiple: int = 64, max_rows: int = 0,
                 hidden_part: tuple[int, int] | None = None):
    """This rank's validation MicroBatches micro-batches: every packed row exactly once (no shuffle, no drop).

    All ranks yield the same number of micro-batches (FSDP needs every rank in every forward); a rank short of
    rows gets empty (all-padding) rows, which contribute no valid positions.
    """
    lengths = {i: source.num_tokens(i) for i in indices}
    plan = pack(list(indices), lengths, max_tokens)
    if max_rows:
        plan = plan[:max_rows]
    per_step = world_size * batch_rows
    for m in range(-(-len(plan) // per_step)):
        rows = [plan[g] if (g := (m * batch_rows + b) * world_size + rank) < len(plan) else []
                for b in range(batch_rows)]
        yield collate(source, rows, pad_multiple, hidden_part)


def open_shards(path: str, verify: bool = True):
    """Stage 2's ShardDataset over `path`, memory-mapped. `verify` (train.advanced.verify_shards): the manifest is
    checked against each shard's own record now and each row's sha256 as `collate` first reads it
    (stage2_hidden/reader.py); False skips both."""
    from stage2_hidden.reader import ShardDataset

    return ShardDataset(path, check_reads=verify)


def check_manifest(manifest: dict[str, Any], target_cfg: dict[str, Any], layer_ids: Sequence[int] | None,
                   where: str) -> list[int]:
    """Refuse shards captured from another target or other layers, before any heavy work; returns the layer ids.

    The aux layer ids are the shards' own (`layer_ids` in stage 2's manifest, checked by
    `common.target.aux_layer_ids`'s rule); a configured list (`train.layer_ids`, None = take the shards') must
    equal them. Also compared: hidden size, vocab size, and num_aux_layers = len(layer_ids).
    """
    from common.target import aux_layer_ids, text_config

    tcfg = text_config(target_cfg)
    n_layers = int(tcfg["num_hidden_layers"])
    got_ids = [int(i) for i in manifest.get("layer_ids", [])]
    problems = []
    for key in ("hidden_size", "vocab_size"):
        if int(manifest.get(key, -1)) != int(tcfg[key]):
            problems.append(f"{key} {manifest.get(key)} in the shards, {tcfg[key]} in the target")
    if int(manifest.get("num_aux_layers", -1)) != len(got_ids):
        problems.append(f"num_aux_layers {manifest.get('num_aux_layers')} != len(layer_ids) {len(got_ids)}")
    try:
        aux_layer_ids(got_ids, n_layers, "the shards' layer_ids")
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError(f"shards {where} do not match the configured target: " + "; ".join(problems))
    if layer_ids is not None and [int(i) for i in layer_ids] != got_ids:
        raise ValueError(f"train.layer_ids={[int(i) for i in layer_ids]} but the shards hold layer_ids {got_ids} "
                         f"({Path(where) / 'manifest.json'}); set train.layer_ids=null to train on the shards' "
                         "layers, or capture the configured ones with stage 2 (hidden.layer_ids)")
    return got_ids

