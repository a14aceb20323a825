"""Stage 3 data: packing, rank striding, resumable order, validation split (plain in-memory rows, no shards)."""
from __future__ import annotations

import pytest
import torch

from stage3_train.data import PackedLoader, Segment, collate, eval_batches, pack, split_rows
from tests.fixtures.stage3 import MemoryRows


def test_pack_first_fit_truncates_and_skips():
    lengths = [5, 3, 12, 1, 4, 2]
    rows = pack(range(6), lengths, max_tokens=8)
    # 5 -> row0; 3 -> row0 (full, closed); 12 -> truncated to 8, row1 alone (full); 1 skipped; 4 -> row2; 2 -> row2
    assert rows == [[Segment(0, 5), Segment(1, 3)], [Segment(2, 8)], [Segment(4, 4), Segment(5, 2)]]
    assert all(sum(s.length for s in r) <= 8 for r in rows)


def test_collate_positions_docs_padding():
    src = MemoryRows.random(n=3, lengths=[3, 2, 5], width=4, seed=0)
    batch = collate(src, [[Segment(0, 3), Segment(1, 2)], [Segment(2, 4)]], pad_multiple=4)
    assert batch.input_ids.shape == (2, 8) and batch.hidden.shape == (2, 8, 4)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert batch.doc_ids[0].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert batch.doc_ids[1].tolist() == [0, 0, 0, 0, -1, -1, -1, -1]
    torch.testing.assert_close(batch.hidden[0, 3:5], src[1]["hidden"])
    torch.testing.assert_close(batch.target_ids[1, :4], src[2]["target_ids"][:4].long())  # truncated
    assert not batch.loss_mask[:, 5:].any() and batch.conversation_ids == [["row-0", "row-1"], ["row-2"]]
    assert batch.sq_tokens == 3 * 3 + 2 * 2 + 4 * 4
    moved = batch.to("cpu")  # every tensor moved, the bookkeeping carried along
    assert moved.conversation_ids == batch.conversation_ids and moved.hidden.shape == batch.hidden.shape


def test_rank_strided_equals_single_process_global_batch():
    src = MemoryRows.random(n=40, lengths=[3 + (7 * i) % 11 for i in range(40)], width=2, seed=1)
    kw = dict(max_tokens=16, seed=3, pad_multiple=8)
    one = PackedLoader(src, range(40), batch_rows=2, rank=0, world_size=1, **kw)
    two = [PackedLoader(src, range(40), batch_rows=1, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(2 * one.steps_per_epoch() + 1):  # crosses an epoch boundary
        b1 = next(one).conversation_ids
        b2 = [next(two[r]).conversation_ids[0] for r in range(2)]
        assert b1 == b2


def test_epochs_reshuffle_and_cover_everything():
    src = MemoryRows.random(n=30, lengths=[4] * 30, width=2, seed=2)
    loader = PackedLoader(src, range(30), max_tokens=8, batch_rows=1, rank=0, world_size=1, seed=0, pad_multiple=8)
    n = loader.steps_per_epoch()
    assert n == 15
    e0 = [tuple(next(loader).conversation_ids[0]) for _ in range(n)]
    e1 = [tuple(next(loader).conversation_ids[0]) for _ in range(n)]
    assert loader.epoch == 1 and e0 != e1
    assert sorted(i for r in e0 for i in r) == sorted(f"row-{i}" for i in range(30))


def test_state_dict_resumes_exactly_and_across_world_sizes():
    src = MemoryRows.random(n=100, lengths=[2 + (5 * i) % 13 for i in range(100)], width=2, seed=3)
    kw = dict(max_tokens=20, seed=7, pad_multiple=4)
    ref = PackedLoader(src, range(100), batch_rows=1, rank=0, world_size=1, **kw)
    assert ref.steps_per_epoch() >= 30
    seq = [next(ref).conversation_ids for _ in range(30)]
    a = PackedLoader(src, range(100), batch_rows=1, rank=0, world_size=1, **kw)
    for _ in range(12):
        next(a)
    sd = a.state_dict()
    assert sd["version"] == 1 and sd["world_size"] == 1 and sd["micro_step"] == 12
    b = PackedLoader(src, range(100), batch_rows=1, rank=0, world_size=1, **kw)
    b.load_state_dict(sd)
    assert [next(b).conversation_ids for _ in range(18)] == seq[12:]
    # two ranks resume at the same global row: micro-batch m of rank r is global row 12 + 2m + r
    two = [PackedLoader(src, range(100), batch_rows=1, rank=r, world_size=2, **kw) for r in range(2)]
    for loader in two:
        loader.load_state_dict(sd)
    assert [next(two[r]).conversation_ids for _ in range(4) for r in range(2)] == seq[12:20]
    with pytest.raises(ValueError, match="do not split"):
        two[0].load_state_dict(dict(sd, micro_step=13))
    with pytest.raises(ValueError, match="seed"):
        two[0].load_state_dict(dict(sd, seed=99))
    with pytest.raises(ValueError, match="version"):
        two[0].load_state_dict(dict(sd, version=0))


def test_split_is_stable_and_nonempty():
    ids = [f"conv-{i}" for i in range(200)]
    train, val = split_rows(ids, 0.1)
    assert 5 < len(val) < 40 and sorted(train + val) == list(range(200))
    # adding rows does not move existing ones between the splits
    train2, val2 = split_rows(ids + [f"new-{i}" for i in range(50)], 0.1)
    assert set(val) == set(v for v in val2 if v < 200)
    _, tiny_val = split_rows(["a", "b"], 0.01)
    assert len(tiny_val) == 1
    assert split_rows(ids, 0.0)[1] == []


def test_eval_batches_cover_each_row_once_with_empty_padding():
    src = MemoryRows.random(n=5, lengths=[6] * 5, width=2, seed=4)
    seen = []
    for r in range(2):
        batches = list(eval_batches(src, range(5), max_tokens=6, batch_rows=1, rank=r, world_size=2,
                                    pad_multiple=2))
        assert len(batches) == 3  # ceil(5 / 2): rank 1's last batch is all padding
        seen += [i for b in batches for row in b.conversation_ids for i in row]
    assert sorted(seen) == [f"row-{i}" for i in range(5)]


def test_not_enough_rows_is_a_clear_error():
    src = MemoryRows.random(n=1, lengths=[4], width=2, seed=5)
    loader = PackedLoader(src, [0], max_tokens=8, batch_rows=1, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="fewer than world_size"):
        next(loader)


def test_prefetcher_hands_out_the_loader_sequence_with_consumer_state():
    from stage3_train.data import Prefetcher

    src = MemoryRows.random(n=30, lengths=[5 + i % 7 for i in range(30)], width=2, seed=6)
    kw = dict(max_tokens=16, batch_rows=1, rank=0, world_size=1, seed=1, pad_multiple=4)
    ref = PackedLoader(src, range(30), **kw)
    expected = [(next(ref).conversation_ids, ref.state_dict()) for _ in range(12)]
    pre = Prefetcher(PackedLoader(src, range(30), **kw), depth=3)
    for ids, state in expected:
        assert next(pre).conversation_ids == ids
        assert pre.state_dict() == state  # not the state of batches still queued
    pre.close()
    assert not pre._thread.is_alive()
