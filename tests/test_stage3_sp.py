"""Sequence parallelism on 2 and 4 CPU processes (gloo) against the single-process TTT attention, loss and grads.

Every worker computes the single-process reference itself (same seeds), then its SP slice, and compares its slice
of the outputs / gradients (and the all-reduced loss, counts and parameter gradients) with it.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stage3_train.attention import Segments, ttt_attention
from stage3_train.model import DraftConfig, Eagle3Draft
from stage3_train.sequence_parallel import SPGroup, shard_batch
from stage3_train.ttt import PackedBatch, ttt_forward, valid_mask

TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=40,
            rms_norm_eps=1e-5, max_position_embeddings=128, rope_theta=10000.0)
# two rows of 26 tokens: row 0 has conversations crossing every border for N = 2 and 4 (one spans ranks 0..2),
# row 1 one long conversation then padding
DOCS = [[0] * 5 + [1] * 13 + [2] * 4 + [3] * 4, [0] * 21 + [-1] * 5]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _batch(T: int, seed: int, width: int = 96, dtype=torch.float64) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    doc = torch.tensor([d[:T] for d in DOCS])
    change = torch.ones_like(doc, dtype=torch.bool)
    change[:, 1:] = doc[:, 1:] != doc[:, :-1]
    pos = torch.zeros_like(doc)
    for b in range(doc.shape[0]):
        start = 0
        for t in range(T):
            start = t if change[b, t] else start
            pos[b, t] = t - start if doc[b, t] >= 0 else 0
    return PackedBatch(torch.randint(0, 40, (2, T), generator=g), torch.randn(2, T, width, generator=g, dtype=dtype),
                       torch.randint(0, 40, (2, T), generator=g), torch.rand(2, T, generator=g) > 0.2, pos, doc)


# ---------------------------------------------------------------- (a) attention
def _attention_worker(depths: list[int]) -> None:
    sp = SPGroup.create(dist.get_world_size(), "cpu")
    for depth in depths:
        _attention_case(sp, depth)


def _attention_case(sp: SPGroup, depth: int) -> None:
    B, T, Hq, Hkv, D = 2, 24, 4, 2, 8
    batch = _batch(T, seed=depth)
    g = torch.Generator().manual_seed(10 + depth)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
    ks = [torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64) for _ in range(depth + 1)]
    vs = [torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64) for _ in range(depth + 1)]
    dout = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
    flat = lambda x: x.reshape(-1, *x.shape[2:]).detach().requires_grad_()  # noqa: E731
    full = [flat(x) for x in (q, *ks, *vs)]
    ref = ttt_attention(full[0], full[1:depth + 2], full[depth + 2:], Segments.from_doc_ids(batch.doc_ids))
    ref_grads = torch.autograd.grad(ref, full, dout.reshape(ref.shape))
    _, shard = shard_batch(batch, sp, ttt_steps=3)
    L = T // sp.size
    cut = lambda x: x[:, sp.rank * L:(sp.rank + 1) * L]  # noqa: E731
    local = [flat(cut(x)) for x in (q, *ks, *vs)]
    out = ttt_attention(local[0], local[1:depth + 2], local[depth + 2:], shard.segments)
    grads = torch.autograd.grad(out, local, cut(dout).reshape(out.shape))
    unflat = lambda x: cut(x.view(B, T, *x.shape[1:])).reshape(-1, *x.shape[1:])  # noqa: E731
    torch.testing.assert_close(out, unflat(ref), rtol=1e-10, atol=1e-10)
    names = ["q"] + [f"k{j}" for j in range(depth + 1)] + [f"v{j}" for j in range(depth + 1)]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, unflat(b), rtol=1e-9, atol=1e-9, msg=f"rank {sp.rank}: grad of {name}")


@pytest.mark.parametrize("world,depths", [(2, [0, 2]), (4, [1, 3])])
def test_sp_attention_matches_single_process(world, depths):
    _spawn(_attention_worker, world, depths)


# ---------------------------------------------------------------- (b) TTT loss and parameter gradients
def _ttt_worker(cases: list[tuple[int, int, bool]]) -> None:
    sp = SPGroup.create(dist.get_world_size(), "cpu")
    for T, k, checkpoint in cases:
        _ttt_case(sp, T, k, checkpoint)


def _ttt_case(sp: SPGroup, T: int, k: int, checkpoint: bool) -> None:
    torch.manual_seed(1)
    model = Eagle3Draft(DraftConfig.from_target_config(TINY, draft_vocab_size=40)).double()
    batch = _batch(T, seed=5)
    weights = torch.tensor([0.8 ** i for i in range(k)], dtype=torch.float64)
    ref = ttt_forward(model, batch, weights, k, checkpoint=checkpoint)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    local, shard = shard_batch(batch, sp, k)
    L = local.input_ids.shape[1]
    # labels near the border: the local valid mask is the slice of the single-process one
    want_valid = valid_mask(batch, k, model.t2d)
    want_valid = torch.nn.functional.pad(want_valid, (0, sp.size * L - T))[:, :, sp.rank * L:(sp.rank + 1) * L]
    assert torch.equal(valid_mask(local, k, model.t2d, shard.halo), want_valid), f"rank {sp.rank}"
    out = ttt_forward(model, local, weights, k, checkpoint=checkpoint, sp=shard)
    out.loss.backward()
    stats = torch.cat([out.loss.detach()[None], out.correct.double(), out.valid.double(), out.ce_sum.double()])
    dist.all_reduce(stats)
    want = torch.cat([ref.loss.detach()[None], ref.correct.double(), ref.valid.double(), ref.ce_sum.double()])
    torch.testing.assert_close(stats[:-k], want[:-k], rtol=1e-10, atol=1e-10)  # loss (fp64), counts (exact)
    torch.testing.assert_close(stats[-k:], want[-k:], rtol=1e-6, atol=0)       # ce_sum is returned in fp32
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-9, atol=1e-11, msg=f"rank {sp.rank}: grad of {n}")


@pytest.mark.parametrize("world,cases", [(2, [(26, 4, False), (25, 3, True)]),
                                         pytest.param(4, [(26, 5, False), (14, 3, True)], marks=pytest.mark.slow)])
def test_sp_ttt_loss_and_grads_match_single_process(world, cases):
    # (T, k, activation checkpointing). T=25 and 14 are not multiples of N: the last slice is padded; at T=14, N=4
    # a slice (4 tokens) is as short as the halo (k+1 = 4) and conversation 1 (tokens 5..13) spans ranks 1..3
    _spawn(_ttt_worker, world, cases)


def test_sp_errors():
    from stage3_train.config import TrainConfig

    with pytest.raises(ValueError):
        TrainConfig(sequence_parallel=0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="divide the world size"):
            SPGroup.create(2, "cpu")
    finally:
        dist.destroy_process_group()
    batch = _batch(8, seed=0)
    sp = SPGroup(None, 0, 2, 0, 1)
    with pytest.raises(ValueError):
        shard_batch(batch, sp, 0)
    local, shard = shard_batch(batch, SPGroup(None, 1, 2, 0, 1), 2)
    assert local.input_ids.shape == (2, 4) and shard.halo["doc_ids"].tolist() == [[-1] * 3] * 2
    # row 0: conversation 0 (tokens 0..4) crosses at 4: 1 local query, 4 prefix keys; row 1: 4 queries, 4 keys
    assert shard.segments.bounds_q == (0, 1, 5) and shard.segments.bounds_k == (0, 4, 8)


@pytest.mark.parametrize("parts", [2, 3])
def test_collate_hidden_part_matches_whole_rows(parts):
    # the loader's per-rank hidden slice (host memory O(T/N)) gives the same local batch as slicing whole rows
    from stage3_train.data import Segment, collate
    from stage3_train.sequence_parallel import shard_collated
    from tests.fixtures.stage3 import MemoryRows

    src = MemoryRows.random(3, [9, 14, 20], width=6, seed=0)
    rows = [[Segment(0, 9), Segment(1, 14)], [Segment(2, 20)]]
    whole = collate(src, rows, pad_multiple=8)             # T = 24
    for r in range(parts):
        sp = SPGroup(None, r, parts, 0, 1)
        part = collate(src, rows, pad_multiple=8, hidden_part=(r, parts))
        a, _ = shard_collated(whole, sp, 3, "cpu")
        b, shard_b = shard_collated(part, sp, 3, "cpu")
        for name in ("input_ids", "hidden", "target_ids", "loss_mask", "position_ids", "doc_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (r, name)
        assert b.hidden.shape[1] == -(-24 // parts) and shard_b.halo["input_ids"].shape == (2, 4)


# ---------------------------------------------------------------- (c) the trainer with train.sequence_parallel=2
def _train_worker(cfg: dict, target: dict) -> None:
    from stage3_train.config import TrainConfig
    from stage3_train.train import run

    run(TrainConfig.from_dict(cfg), target)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("world,sp", [(2, 2), (4, 2)])
def test_training_with_sequence_parallel_matches_one_process(tmp_path, tiny_stage3, world, sp):
    # the same global batch (world / sp rows per step): 1 process with grad_accum = world / sp, or world processes
    # in a (dp = world / sp) x (sp) mesh, each SP group splitting its rows
    from stage3_train.config import TrainConfig
    from stage3_train.train import run

    target, shards = tiny_stage3
    base = dict(input=str(shards), max_tokens=64, pad_multiple=16, ttt_steps=3, steps=3, lr=3e-3, warmup_steps=1,
                log_every=1, eval_every=3, ckpt_every=0, param_dtype="float32", val_fraction=0.1, export=False,
                device="cpu")
    run(TrainConfig(**base, output=str(tmp_path / "one"), grad_accum=world // sp), {"path": str(target)})
    two = TrainConfig(**base, output=str(tmp_path / "sp2"), grad_accum=1, sequence_parallel=sp).to_dict()
    _spawn(_train_worker, world, two, {"path": str(target)})
    a, b = _records(tmp_path / "one"), _records(tmp_path / "sp2")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), (ra, rb)
        assert rb["acc"] == pytest.approx(ra["acc"], abs=1e-9), (ra, rb)
