"""Shard integrity as stage 3 reads: a flipped byte or an edited manifest stops training naming the shard, checked
per row (shards with per-row sums) or per shard (older records, or a folder without .parts), by default."""
from __future__ import annotations

import json

import pytest

from stage2_hidden.format import ShardIntegrityError
from stage2_hidden.reader import ShardDataset
from stage3_train.config import TrainConfig
from stage3_train.data import PackedLoader, Prefetcher, Segment, collate, open_shards
from tests.fixtures.shards import write_shards
from tests.test_stage2_shards import FIELDS, make_rows


def _shard_set(folder, n: int = 6):
    write_shards(folder, make_rows(n), FIELDS, rows_per_shard=2)  # 3 shards of 2 rows
    return folder


def _flip(path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF  # same size, still parses
    path.write_bytes(bytes(data))


def _read_all(ds) -> None:
    """Every row through the trainer's path: PackedLoader collated in the Prefetcher's background thread."""
    loader = PackedLoader(ds, range(len(ds)), max_tokens=64, batch_rows=1, rank=0, world_size=1, seed=0,
                          pad_multiple=16)
    batches = Prefetcher(loader, depth=2)
    try:
        for _ in range(loader.steps_per_epoch()):
            next(batches)
    finally:
        batches.close()


def test_flipped_byte_mid_shard_stops_the_default_loader_naming_the_shard(tmp_path):
    folder = _shard_set(tmp_path)
    _read_all(open_shards(str(folder), TrainConfig().verify_shards))  # the clean set reads through
    _flip(folder / "shard-00001.arrow")
    ds = open_shards(str(folder), TrainConfig().verify_shards)  # as the trainer opens it: structure is intact
    with pytest.raises(ShardIntegrityError, match=r"shard-00001\.arrow: sha256 mismatch in row \d.*re-run stage 2"):
        _read_all(ds)


def test_edited_manifest_checksum_is_refused_at_open(tmp_path):
    folder = _shard_set(tmp_path)
    mpath = folder / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["shards"][2]["sha256"] = "0" * 64
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ShardIntegrityError, match=r"shard-00002\.arrow: the manifest says sha256 0{64}.*"
                                                  r"shard-00002\.arrow\.json says [0-9a-f]{64}"):
        open_shards(str(folder), TrainConfig().verify_shards)


def test_check_is_per_row(tmp_path):
    """A flipped byte in row 1 of a shard: row 0 of the same shard still reads; row 1 is refused."""
    folder = _shard_set(tmp_path)
    record = json.loads((folder / ".parts" / "shard-00000.arrow.json").read_text())
    start, end = record["row_offsets"][1:3]
    _flip(folder / "shard-00000.arrow", (start + end) // 2)
    ds = ShardDataset(folder)
    ds.check_row(0)
    collate(ds, [[Segment(0, ds.num_tokens(0))]], pad_multiple=16)
    with pytest.raises(ShardIntegrityError, match=r"shard-00000\.arrow: sha256 mismatch in row 1"):
        collate(ds, [[Segment(1, ds.num_tokens(1))]], pad_multiple=16)


def _drop_row_sums(folder) -> None:
    """Records as stage 2 wrote them before per-row sums existed."""
    for path in (folder / ".parts").glob("shard-*.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in record.items()
                                    if k not in ("row_offsets", "row_sha256", "tail_sha256")}))


@pytest.mark.parametrize("layout", ["records without row sums", "no .parts folder"])
def test_older_shards_are_checked_whole_on_first_read(tmp_path, layout):
    import shutil

    folder = _shard_set(tmp_path)
    if layout == "no .parts folder":
        shutil.rmtree(folder / ".parts")
    else:
        _drop_row_sums(folder)
    _read_all(open_shards(str(folder)))  # clean: reads through
    _flip(folder / "shard-00002.arrow")
    with pytest.raises(ShardIntegrityError, match=r"shard-00002\.arrow: sha256 mismatch.*re-run stage 2"):
        _read_all(open_shards(str(folder)))


def test_verify_shards_false_skips_the_checks(tmp_path):
    folder = _shard_set(tmp_path)
    _flip(folder / "shard-00001.arrow")
    mpath = folder / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["shards"][0]["sha256"] = "f" * 64
    mpath.write_text(json.dumps(manifest))
    _read_all(open_shards(str(folder), verify=False))  # the opt-out trains on it, as asked


def test_full_verify_catches_an_edited_row_sum(tmp_path):
    """`make inspect` (verify) re-hashes everything: the file and each row against the shard's record."""
    folder = _shard_set(tmp_path)
    rpath = folder / ".parts" / "shard-00001.arrow.json"
    record = json.loads(rpath.read_text())
    record["row_sha256"][1] = "0" * 64
    rpath.write_text(json.dumps(record))
    with pytest.raises(ShardIntegrityError, match=r"shard-00001\.arrow: sha256 mismatch in row 1"):
        ShardDataset(folder, verify=True)


def test_the_trainer_stops_on_a_damaged_shard_set(tmp_path, tiny_stage3):
    """`make train`'s path end to end (train.run, default config): damaged rows stop it with the named error."""
    import shutil

    from stage3_train.train import run
    from tests.test_stage3_train import small_cfg

    target, shards = tiny_stage3
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)  # the session's shard set stays clean
    for rpath in sorted((folder / ".parts").glob("shard-*.json")):
        record = json.loads(rpath.read_text())
        for start, end in zip(record["row_offsets"], record["row_offsets"][1:]):
            _flip(folder / record["file"], (start + end) // 2)  # one byte inside every row
    with pytest.raises(ShardIntegrityError, match=r"shard-\d{5}\.arrow: sha256 mismatch in row \d+"):
        run(small_cfg(folder, tmp_path / "run"), {"path": str(target)})


def test_sequence_parallel_group_checks_a_row_on_one_rank(tmp_path):
    """Under sequence parallelism every rank of a group collates the same row, keeping one slice of its features:
    the rank of slice 0 checks the whole row (and refuses a damaged one); the others do not hash it again."""
    folder = _shard_set(tmp_path)
    record = json.loads((folder / ".parts" / "shard-00000.arrow.json").read_text())
    start, end = record["row_offsets"][1:3]
    _flip(folder / "shard-00000.arrow", (start + end) // 2)
    ds = ShardDataset(folder)
    row = [[Segment(1, ds.num_tokens(1))]]
    collate(ds, row, pad_multiple=16, hidden_part=(1, 2))   # slice 1's rank: no check, no error
    with pytest.raises(ShardIntegrityError, match=r"shard-00000\.arrow: sha256 mismatch in row 1"):
        collate(ds, row, pad_multiple=16, hidden_part=(0, 2))
