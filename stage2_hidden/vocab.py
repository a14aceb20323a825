"""Draft vocabulary: the ``draft_vocab_size`` target tokens the draft predicts.

Counts are of the labels training uses (the tokens the draft must learn to propose): within one row, label
``target_ids[j]`` counts iff ``loss_mask[j+1]`` -- ``target_ids[j]`` is the target's prediction of token j+1, and
stage 3 (ttt.py) trains on it only when token j+1 is an assistant token. Per row that is
``target_ids[:-1][loss_mask[1:]]``; the last position of a row has no next token and never counts. The
top ``Vd`` tokens by count (ties: smaller id first) sorted by id give ``tok[i]``; then

    d2t[i] = tok[i] - i          (int64 [Vd]; target id = i + d2t[i], the EAGLE-3 export format)
    t2d[v] = v in tok            (bool [V])

and ``coverage`` = share of those labels whose token is in the draft vocab.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_save_file

from .format import open_shard

VOCAB_FILE = "vocab.safetensors"


def trained_labels(target_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """The labels training uses in one row: ``target_ids[j]`` where ``loss_mask[j+1]``."""
    return np.asarray(target_ids)[:-1][np.asarray(loss_mask).astype(bool)[1:]]


def count_targets(shard_paths, vocab_size: int) -> np.ndarray:
    """int64 [V] counts of the trained labels (`trained_labels`), over all rows of the shards."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for path in shard_paths:
        reader = open_shard(path)
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            # flat values + offsets: the shift must stay inside each row (row ends are no "next token")
            tgt_col, mask_col = batch.column("target_ids"), batch.column("loss_mask")
            tgt = np.asarray(tgt_col.flatten())
            mask = np.asarray(mask_col.flatten()).astype(bool)
            offsets = np.asarray(tgt_col.offsets) - int(tgt_col.offsets[0].as_py())
            if len(tgt) != len(mask) or not np.array_equal(offsets, np.asarray(mask_col.offsets) -
                                                           int(mask_col.offsets[0].as_py())):
                raise ValueError(f"{path}: target_ids and loss_mask rows differ in length")
            take = np.zeros(len(tgt), dtype=bool)
            take[:-1] = mask[1:]
            ends = offsets[1:][offsets[1:] > offsets[:-1]] - 1  # each non-empty row's last token: no next token
            take[ends] = False
            counts += np.bincount(tgt[take], minlength=vocab_size)[:vocab_size]
    return counts


def build_vocab(counts: np.ndarray, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(d2t int64 [Vd], t2d bool [V], coverage) from target-token counts."""
    V = len(counts)
    if not 0 < draft_vocab_size <= V:
        raise ValueError(f"draft_vocab_size {draft_vocab_size} must be in [1, {V}]")
    order = np.argsort(-counts, kind="stable")          # most frequent first, ties by id
    tok = np.sort(order[:draft_vocab_size])             # [Vd] target ids, ascending
    d2t = torch.from_numpy(tok - np.arange(draft_vocab_size)).to(torch.int64)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[torch.from_numpy(tok)] = True
    total = counts.sum()
    coverage = float(counts[tok].sum() / total) if total else 0.0
    return d2t, t2d, coverage


def save_vocab(out_dir, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    tensors = {"d2t": d2t.contiguous(), "t2d": t2d.contiguous()}
    atomic_save_file(Path(out_dir) / VOCAB_FILE, lambda tmp: save_file(tensors, tmp))


def load_vocab(out_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t LongTensor [Vd], t2d BoolTensor [V]) saved next to the shards."""
    path = Path(out_dir) / VOCAB_FILE
    if not path.exists():
        raise ValueError(f"{path}: no draft vocabulary (run stage 2 to completion)")
    tensors = load_file(str(path))
    return tensors["d2t"], tensors["t2d"]


def build_and_save_vocab(out_dir, shard_files, vocab_size: int, draft_vocab_size: int) -> float:
    """Count, build and save; returns the coverage."""
    counts = count_targets([Path(out_dir) / f for f in shard_files], vocab_size)
    d2t, t2d, coverage = build_vocab(counts, draft_vocab_size)
    save_vocab(out_dir, d2t, t2d)
    return coverage
