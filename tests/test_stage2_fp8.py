"""fp8 shards (hidden.storage_dtype=float8_e4m3): rounding, the reader's dequantised rows, refusal of what it does
not know, half the bytes, and the real stage-2 pipeline writing them."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from stage2_hidden.format import bytes_per_token, dequantize_fp8, quantize_fp8
from stage2_hidden.reader import ShardDataset
from tests.fixtures.shards import write_shards
from tests.test_stage2_shards import FIELDS, H, make_rows

FP8 = {**FIELDS, "dtype": "float8_e4m3"}


def _within_fp8_rounding(x: torch.Tensor, y: torch.Tensor, scale_TL: torch.Tensor, rel: float = 1 / 16) -> None:
    """e4m3 keeps 3 mantissa bits: |x - y| <= |x| / 16 for normal values, plus the subnormal step near 0
    (2^-9 of the scale, the smallest e4m3 subnormal times the scale)."""
    L = scale_TL.shape[-1]
    step = scale_TL.repeat_interleave(x.shape[-1] // L, dim=-1) * 2.0 ** -9
    err = (x.float() - y.float()).abs()
    assert bool((err <= x.float().abs() * rel + step + 1e-30).all()), float((err - x.float().abs() * rel).max())


def test_quantize_round_trip_per_token_and_layer():
    g = torch.Generator().manual_seed(0)
    # three aux layers of very different magnitude (the residual stream grows with depth), and an all-zero token
    x = torch.cat([torch.randn(64, H, generator=g) * s for s in (0.05, 3.0, 400.0)], dim=-1).to(torch.bfloat16)
    x[7] = 0
    q, scale = quantize_fp8(x, 3)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (64, 3)
    assert float(q.float().abs().max()) <= 448.0
    y = dequantize_fp8(q, scale)
    assert y.dtype == torch.bfloat16 and torch.equal(y[7], torch.zeros_like(y[7]))
    _within_fp8_rounding(x, y, scale)
    assert torch.equal(dequantize_fp8(q[None], scale[None])[0], y)  # any leading shape


def test_fp8_shards_read_back_within_rounding_and_half_the_bytes(tmp_path):
    rows = make_rows(4, lengths=[300, 500, 200, 800])
    bf16 = write_shards(tmp_path / "bf16", rows, FIELDS, rows_per_shard=2)
    fp8 = write_shards(tmp_path / "fp8", rows, FP8, rows_per_shard=2)
    assert fp8["dtype"] == "float8_e4m3" and bytes_per_token(3 * H, 3, "float8_e4m3") == 3 * H + 12 + 9
    assert abs(fp8["bytes_per_token"] / (3 * H + 12 + 9) - 1) < 0.02, fp8["bytes_per_token"]
    assert fp8["bytes"] < 0.52 * bf16["bytes"]
    ds = ShardDataset(tmp_path / "fp8", verify=True)
    for i, ref in enumerate(rows):
        row = ds[i]
        assert row["hidden"].dtype == torch.float8_e4m3fn and row["hidden_scale"].shape == (len(ref["hidden"]), 3)
        for key in ("input_ids", "loss_mask", "target_ids"):
            assert torch.equal(row[key], ref[key].to(row[key].dtype))
        _within_fp8_rounding(ref["hidden"], dequantize_fp8(row["hidden"], row["hidden_scale"]), row["hidden_scale"])


def _rewrite_schema_dtype(path, dtype: str) -> None:
    """The same shard with its schema metadata claiming another hidden dtype."""
    table = pa.ipc.open_file(pa.py_buffer(path.read_bytes())).read_all()  # in memory: the file is rewritten
    meta = {**table.schema.metadata, b"eagle3.hidden_dtype": dtype.encode()}
    with pa.ipc.new_file(str(path), table.schema.with_metadata(meta)) as w:
        for batch in table.to_batches(max_chunksize=1):
            w.write_batch(batch)


def test_unknown_or_corrupted_fp8_shard_is_refused_by_name(tmp_path):
    write_shards(tmp_path / "a", make_rows(2), FP8, rows_per_shard=2)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    shard = tmp_path / "a" / manifest["shards"][0]["file"]
    _rewrite_schema_dtype(shard, "float4_e2m1")
    with pytest.raises(ValueError, match=rf"{shard.name}.*unknown hidden storage dtype 'float4_e2m1'"):
        ShardDataset(tmp_path / "a")

    write_shards(tmp_path / "b", make_rows(2), FP8, rows_per_shard=2)
    mpath = tmp_path / "b" / "manifest.json"
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), "dtype": "int4"}))
    with pytest.raises(ValueError, match="manifest.json: dtype.*unknown hidden storage dtype 'int4'"):
        ShardDataset(tmp_path / "b")

    write_shards(tmp_path / "c", make_rows(2), FP8, rows_per_shard=2)
    shard = tmp_path / "c" / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF                           # one flipped byte inside the hidden states
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00000.arrow: sha256 mismatch"):
        ShardDataset(tmp_path / "c", verify=True)


def test_pipeline_writes_fp8_that_dequantise_to_the_bf16_shards(tmp_path, smollm2_dir):
    from common.target import TargetSpec
    from stage2_hidden.config import HiddenConfig
    from stage2_hidden.pipeline import run
    from tests.test_stage2_pipeline import write_conversations

    inp = write_conversations(tmp_path / "in.jsonl", 3)
    target = TargetSpec(name="smollm2-135m", path=str(smollm2_dir), dtype="float32", context_length=8192)
    kw = dict(input=str(inp), rows_per_shard=2, batch_tokens=256, draft_vocab_size=64, device="cpu")
    ref = run(target, HiddenConfig(output=str(tmp_path / "bf16"), **kw))
    got = run(target, HiddenConfig(output=str(tmp_path / "fp8"), storage_dtype="float8_e4m3", **kw))
    assert got["dtype"] == "float8_e4m3" and got["num_tokens"] == ref["num_tokens"]
    assert got["bytes_per_token"] < 0.55 * ref["bytes_per_token"]
    a, b = ShardDataset(tmp_path / "bf16"), ShardDataset(tmp_path / "fp8", verify=True)
    for i in range(len(a)):
        assert torch.equal(a[i]["target_ids"], b[i]["target_ids"])
        # the bf16 shard and the fp8 one both round the same fp32 forward: fp8's 2^-4 plus bf16's 2^-9 twice
        _within_fp8_rounding(a[i]["hidden"], dequantize_fp8(b[i]["hidden"], b[i]["hidden_scale"], torch.float32),
                             b[i]["hidden_scale"], rel=1 / 16 + 2 / 512)


def test_stage3_trains_from_fp8_shards_like_from_bf16(tmp_path, tiny_stage3):
    """The trainer reads fp8 shards (dequantised where it computes) and learns as from the bf16 ones."""
    from stage3_train.data import collate, Segment
    from stage3_train.train import run
    from tests.fixtures.stage3 import TINY, TINY_LAYERS, tiny_rows
    from tests.test_stage3_train import small_cfg, train_records

    target, _ = tiny_stage3
    rows = list(tiny_rows(24, seed=3))
    fields = {"layer_ids": TINY_LAYERS, "hidden_size": TINY["hidden_size"], "vocab_size": TINY["vocab_size"]}
    write_shards(tmp_path / "bf16", rows, fields, draft_vocab_size=64)
    write_shards(tmp_path / "fp8", rows, {**fields, "dtype": "float8_e4m3"}, draft_vocab_size=64)

    ds = ShardDataset(tmp_path / "fp8")
    mb = collate(ds, [[Segment(0, ds.num_tokens(0)), Segment(1, ds.num_tokens(1))]], pad_multiple=64)
    assert mb.hidden.dtype == torch.float8_e4m3fn and mb.hidden_scale.shape == (1, 64, len(TINY_LAYERS))
    batch = mb.packed("cpu")
    assert batch.hidden.dtype == torch.bfloat16
    n0 = ds.num_tokens(0)
    _within_fp8_rounding(rows[0]["hidden"], batch.hidden[0, :n0], ds[0]["hidden_scale"])
    assert not batch.hidden[0, ds.num_tokens(0) + ds.num_tokens(1):].any()   # padding dequantises to 0

    losses = {}
    for name in ("bf16", "fp8"):
        run(small_cfg(tmp_path / name, tmp_path / f"run-{name}", steps=12), {"path": str(target)})
        losses[name] = [r["loss"] for r in train_records(tmp_path / f"run-{name}")]
    assert losses["fp8"][-1] < losses["fp8"][0]                                   # it learns
    for a, b in zip(losses["bf16"], losses["fp8"]):
        assert b == pytest.approx(a, rel=0.05)                                    # as from the bf16 rows
