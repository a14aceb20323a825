"""Shards, reader, vocabulary and inspect on hand-made rows (no model)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stage2_hidden import inspect as inspect_mod
from stage2_hidden.reader import ShardDataset
from tests.fixtures.shards import write_shards
from stage2_hidden.vocab import build_vocab, load_vocab

H, LAYERS, V = 576, [2, 15, 27], 50


def make_rows(n: int, seed: int = 0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        T = lengths[i] if lengths else 20 + 7 * i
        rows.append({"id": f"c{i}", "input_ids": torch.randint(0, V, (T,), generator=g, dtype=torch.int32),
                     "loss_mask": (torch.rand(T, generator=g) < 0.5).to(torch.uint8),
                     "target_ids": torch.randint(0, V, (T,), generator=g, dtype=torch.int32),
                     "hidden": torch.randn(T, 3 * H, generator=g).to(torch.bfloat16)})
    return rows


FIELDS = {"layer_ids": LAYERS, "hidden_size": H, "vocab_size": V, "target": {"name": "test"}, "max_length": 4096}


def test_round_trip(tmp_path):
    rows = make_rows(5)
    manifest = write_shards(tmp_path, rows, FIELDS, rows_per_shard=2, draft_vocab_size=20)
    assert [s["rows"] for s in manifest["shards"]] == [2, 2, 1]
    ds = ShardDataset(tmp_path, verify=True)
    assert len(ds) == 5 and ds.manifest["draft_vocab_size"] == 20
    for i, ref in enumerate(rows):
        row = ds[i]
        assert row["id"] == ref["id"] and ds.num_tokens(i) == len(ref["input_ids"])
        for key in ("input_ids", "loss_mask", "target_ids"):
            assert torch.equal(row[key], ref[key].to(row[key].dtype))
        assert row["hidden"].dtype == torch.bfloat16 and row["hidden"].shape == (len(ref["input_ids"]), 3 * H)
        assert torch.equal(row["hidden"], ref["hidden"])


def test_zero_copy(tmp_path):
    write_shards(tmp_path, make_rows(2), FIELDS, rows_per_shard=2)
    ds = ShardDataset(tmp_path)
    a, b = ds[0]["hidden"], ds[0]["hidden"]
    assert a.data_ptr() == b.data_ptr()  # both view the same mapped bytes
    mapped = ds._readers[0].get_batch(0).column("hidden").buffers()[2]  # the bytes in the memory map
    assert a.data_ptr() == mapped.address and not mapped.is_mutable


def test_bytes_per_token_within_2_percent(tmp_path):
    m = write_shards(tmp_path, make_rows(4, lengths=[300, 500, 200, 800]), FIELDS, rows_per_shard=2)
    expected = 3 * H * 2 + 9
    assert abs(m["bytes_per_token"] / expected - 1) < 0.02, m["bytes_per_token"]


def test_truncated_shard_named(tmp_path):
    write_shards(tmp_path, make_rows(4), FIELDS, rows_per_shard=2)
    path = tmp_path / "shard-00001.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="shard-00001.arrow"):
        ShardDataset(tmp_path)


def test_corrupted_shard_named(tmp_path):
    write_shards(tmp_path, make_rows(4), FIELDS, rows_per_shard=2)
    path = tmp_path / "shard-00000.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit inside the hidden bytes: same size, still parses
    path.write_bytes(bytes(data))
    ds = ShardDataset(tmp_path)  # opening checks structure only
    with pytest.raises(ValueError, match="shard-00000.arrow.*sha256"):
        ds.verify()
    with pytest.raises(ValueError, match="shard-00000.arrow"):
        ShardDataset(tmp_path, verify=True)
    assert inspect_mod.main([str(tmp_path)]) == 1


def test_missing_manifest(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        ShardDataset(tmp_path)


def test_unparsable_manifest_named(tmp_path):
    write_shards(tmp_path, make_rows(2), FIELDS, rows_per_shard=2)
    mpath = tmp_path / "manifest.json"
    mpath.write_text(mpath.read_text()[:-40])  # cut short
    with pytest.raises(ValueError, match=rf"{mpath}: not valid JSON.*re-run stage 2"):
        ShardDataset(tmp_path)


def test_resume_rewrites_a_damaged_complete_shard(tmp_path, caplog):
    """shard_info(verify=True), as a restarted stage 2 calls it: a complete shard is kept only if it still hashes
    to its record; a damaged one (or one without a record) is deleted with a warning naming it."""
    from stage2_hidden.shards import shard_info

    write_shards(tmp_path, make_rows(6), FIELDS, rows_per_shard=2)
    kept = shard_info(tmp_path, 0, verify=True)
    assert kept == json.loads((tmp_path / ".parts" / "shard-00000.arrow.json").read_text())
    path = tmp_path / "shard-00001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert shard_info(tmp_path, 1) is not None  # without verify: trusted (the manifest's last pass, same run)
    with caplog.at_level("WARNING", logger="eagle3.stage2"):
        assert shard_info(tmp_path, 1, verify=True) is None
    assert "shard-00001.arrow: sha256 mismatch" in caplog.text and "rewriting it" in caplog.text
    assert not path.exists() and not (tmp_path / ".parts" / "shard-00001.arrow.json").exists()
    (tmp_path / ".parts" / "shard-00002.arrow.json").unlink()  # killed between the rename and the record
    assert shard_info(tmp_path, 2, verify=True) is None and not (tmp_path / "shard-00002.arrow").exists()


def test_build_vocab_by_hand():
    counts = np.array([5, 0, 9, 9, 1, 7, 0, 3], dtype=np.int64)
    d2t, t2d, coverage = build_vocab(counts, 3)
    # top 3 by count: 2 (9), 3 (9, tie -> smaller id first), 5 (7); sorted ascending: [2, 3, 5]
    assert d2t.tolist() == [2, 2, 3] and d2t.dtype == torch.int64
    assert torch.nonzero(t2d).flatten().tolist() == [2, 3, 5]
    assert coverage == pytest.approx(25 / 34)
    with pytest.raises(ValueError):
        build_vocab(counts, 9)


def test_vocab_round_trip(tmp_path):
    rows = make_rows(6)
    m = write_shards(tmp_path, rows, FIELDS, rows_per_shard=4, draft_vocab_size=16)
    d2t, t2d = load_vocab(tmp_path)
    assert d2t.shape == (16,) and t2d.shape == (V,) and int(t2d.sum()) == 16
    target = torch.arange(16) + d2t               # draft -> target
    assert torch.equal(torch.nonzero(t2d).flatten(), target)   # t2d marks exactly those
    draft_of = torch.cumsum(t2d.long(), 0) - 1     # target -> draft index on the kept tokens
    assert torch.equal(draft_of[target], torch.arange(16))
    # coverage recomputed from the rows, over the labels training uses: target_ids[j] where loss_mask[j+1]
    masked = torch.cat([r["target_ids"][:-1][r["loss_mask"][1:].bool()] for r in rows]).long()
    assert m["coverage"] == pytest.approx(t2d[masked].float().mean().item())
    # the kept tokens are the most frequent masked targets
    counts = torch.bincount(masked, minlength=V)
    assert counts[t2d].min() >= counts[~t2d].max()


def test_inspect_prints_summary(tmp_path, capsys):
    write_shards(tmp_path, make_rows(3), FIELDS, rows_per_shard=2)
    assert inspect_mod.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer ids       [2, 15, 27]" in out and "checksums       ok (2 shards)" in out
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is True


def test_writer_hash_follows_large_rows(tmp_path):
    """Rows of several MB, larger than the flusher's step: the sha256 hashed while writing = the file's."""
    import hashlib
    import threading

    from stage2_hidden.format import make_schema
    from stage2_hidden.shards import ShardWriter

    before = threading.active_count()
    w = ShardWriter(tmp_path, 0, make_schema(3 * H, LAYERS), flush_bytes=1 << 20)
    for row in make_rows(3, lengths=[5000, 3, 9000]):  # 17 MB, 10 KB, 31 MB of hidden bytes
        w.write_row(row["id"], row["input_ids"], row["loss_mask"], row["target_ids"], row["hidden"])
    info = w.close()
    data = (tmp_path / info["file"]).read_bytes()
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    assert info["rows"] == 3 and info["tokens"] == 14003
    # the per-row sums tile the file: each row's byte range, then the footer
    offsets = info["row_offsets"]
    assert len(offsets) == 4 and offsets[0] == 0 and offsets[-1] < len(data)
    assert info["row_sha256"] == [hashlib.sha256(data[a:b]).hexdigest() for a, b in zip(offsets, offsets[1:])]
    assert info["tail_sha256"] == hashlib.sha256(data[offsets[-1]:]).hexdigest()
    assert offsets[2] - offsets[1] < 20_000 < offsets[3] - offsets[2]  # row 1 is the 3-token one
    assert threading.active_count() == before and not list(tmp_path.glob(".tmp-*"))


def test_writer_abort_stops_helpers(tmp_path):
    import threading

    from stage2_hidden.format import make_schema
    from stage2_hidden.shards import ShardWriter

    before = threading.active_count()
    w = ShardWriter(tmp_path, 0, make_schema(3 * H, LAYERS))
    row = make_rows(1)[0]
    w.write_row(row["id"], row["input_ids"], row["loss_mask"], row["target_ids"], row["hidden"])
    with pytest.raises(ValueError, match="lengths disagree"):
        w.write_row("bad", row["input_ids"], row["loss_mask"][:-1], row["target_ids"], row["hidden"])
    w.abort()
    assert threading.active_count() == before and not list(tmp_path.iterdir())


def test_async_writer_error_surfaces_and_frees_buffers(tmp_path):
    """A failing row: the error reaches the caller and the staging buffer goes back to the ring."""
    import queue

    from stage2_hidden.pipeline import AsyncShardWriter
    from stage2_hidden.staging import Staged
    from stage2_hidden.render import Rendered
    from stage2_hidden.format import make_schema

    ring = queue.Queue()
    row = Rendered("c0", np.zeros(4, np.int32), np.ones(4, np.uint8), "template")
    staged = Staged(torch.zeros(4, 3 * H, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int32),
                    _ring=ring, _slot=["buffer"])
    writer = AsyncShardWriter(tmp_path, make_schema(3 * H, LAYERS), 2, 1)
    writer.put(("open", 0))
    writer.put(("rows", 0, staged, [(row, 0, 4)]))  # 4 ids, 3 targets
    writer.put(("close", 0))
    with pytest.raises(RuntimeError, match="shard writer failed"):
        writer.finish()
    assert ring.get_nowait() == ["buffer"] and not list(tmp_path.glob("*.arrow"))


def test_full_disk_is_named_with_the_folder(tmp_path, monkeypatch):
    import errno

    from stage2_hidden.pipeline import AsyncShardWriter, ShardWriteError
    from stage2_hidden.staging import Staged
    from stage2_hidden.render import Rendered
    from stage2_hidden.format import make_schema
    from stage2_hidden.shards import _HashingSink

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_HashingSink, "write", full)
    row = Rendered("c0", np.zeros(4, np.int32), np.ones(4, np.uint8), "template")
    writer = AsyncShardWriter(tmp_path, make_schema(3 * H, LAYERS), 2, 1)
    writer.put(("open", 0))
    writer.put(("rows", 0, Staged(torch.zeros(4, 3 * H, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.int32)),
                [(row, 0, 4)]))
    writer.put(("close", 0))
    with pytest.raises(ShardWriteError, match=rf"no space left on device writing shards to {tmp_path} \(") as info:
        writer.finish()
    assert info.value.disk_full and not list(tmp_path.glob(".tmp-*"))  # the partial shard gave its space back


def test_staging_views_disjoint_and_aligned():
    from stage2_hidden.staging import staging_bytes, staging_views

    for T, W in [(3, 5), (1, 1), (7, 96)]:
        buf = torch.zeros(staging_bytes(T, W), dtype=torch.uint8)
        hidden, target = staging_views(buf, T, W)
        hidden.copy_(torch.randn(T, W))
        target.copy_(torch.arange(T, dtype=torch.int32) - 5)
        assert hidden.shape == (T, W) and target.tolist() == list(range(-5, T - 5))
        assert (target.data_ptr() - buf.data_ptr()) % 64 == 0
        assert target.data_ptr() >= hidden.data_ptr() + hidden.numel() * 2
