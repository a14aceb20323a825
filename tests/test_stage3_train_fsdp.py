"""FSDP2 on 2 CPU processes (gloo) trains exactly like 1 process on the same global batches."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stage3_train.config import TrainConfig
from stage3_train.train import run


def _worker(rank: int, world: int, port: int, cfg: dict, target: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(TrainConfig.from_dict(cfg), target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("param_dtype,rtol",
                         [("float32", 1e-5), pytest.param("bfloat16", 2e-2, marks=pytest.mark.slow)])
def test_two_processes_match_one(tmp_path, tiny_stage3, param_dtype, rtol):
    target, shards = tiny_stage3
    base = dict(input=str(shards), max_tokens=64, pad_multiple=16, ttt_steps=3, steps=4, lr=3e-3, warmup_steps=1,
                log_every=1, eval_every=2, ckpt_every=0, param_dtype=param_dtype, val_fraction=0.1, export=False,
                device="cpu")
    # the same global batch of 2 packed rows per step: 1 process x 2 micro-batches, or 2 processes x 1
    one = TrainConfig(**base, output=str(tmp_path / "one"), grad_accum=2)
    run(one, {"path": str(target)})
    two = TrainConfig(**base, output=str(tmp_path / "two"), grad_accum=1).to_dict()
    mp.spawn(_worker, args=(2, _free_port(), two, {"path": str(target)}), nprocs=2, join=True)
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=rtol), (ra, rb)
        assert rb["acc"] == pytest.approx(ra["acc"], abs=0.02 if param_dtype == "bfloat16" else 1e-9), (ra, rb)
    assert (tmp_path / "two/checkpoints/step-4/__1_0.distcp").is_file()  # both ranks wrote their shard
    # the safe copy of the weights (what export and evaluation read) is gathered whole on rank 0: the same
    # tensors as the one-process run's
    from safetensors.torch import load_file

    full_one = load_file(tmp_path / "one/checkpoints/step-4/model.safetensors")
    full_two = load_file(tmp_path / "two/checkpoints/step-4/model.safetensors")
    assert full_two.keys() == full_one.keys() and "fc.weight" in full_two
    for name, tensor in full_one.items():
        assert full_two[name].shape == tensor.shape, name
        torch.testing.assert_close(full_two[name].float(), tensor.float(), atol=10 * rtol, rtol=10 * rtol)


def test_cpu_offload_trains_the_same_steps(tmp_path, tiny_stage3):
    """train.cpu_offload=true (FSDP2 CPUOffloadPolicy, the non-fused AdamW) gives the same losses as without, and
    its checkpoint holds the same weights."""
    target, shards = tiny_stage3
    base = dict(input=str(shards), max_tokens=64, pad_multiple=16, ttt_steps=2, steps=3, lr=3e-3, warmup_steps=1,
                log_every=1, eval_every=0, ckpt_every=0, param_dtype="float32", val_fraction=0.0, export=False,
                device="cpu")
    run(TrainConfig(**base, output=str(tmp_path / "plain")), {"path": str(target)})
    run(TrainConfig(**base, output=str(tmp_path / "offload"), cpu_offload=True), {"path": str(target)})
    a, b = _records(tmp_path / "plain"), _records(tmp_path / "offload")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6) and len(a) == 3
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "plain/checkpoints/step-3/model.safetensors")
    wb = load_file(tmp_path / "offload/checkpoints/step-3/model.safetensors")
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=1e-6, atol=1e-7)
