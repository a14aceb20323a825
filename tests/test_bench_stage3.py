"""benchmarks/bench_stage3.py times the trainer's own step: on the CPU, its losses equal `stage3_train.train.run`'s
for the same shards and config (tiny shape, two steps), and the SpecForge column is skipped with a message."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from stage3_train.config import TrainConfig
from stage3_train.train import run

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_stage3.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_stage3", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_step_is_the_trainers_step(tmp_path):
    bench = _bench()
    out = tmp_path / "bench"
    report = bench.main(["--shape", "tiny", "--device", "cpu", "--lengths", "64", "--ttt", "3", "--warmup", "1",
                         "--iters", "1", "--rows", "3", "--keep-shards", "--specforge", str(tmp_path / "none"),
                         "--out", str(out)])
    assert json.loads((out / "bench_stage3.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    (row,) = report["rows"]
    ours = row["ours"]
    assert row["tokens"] == 64 and ours["tokens_per_s"] > 0 and ours["activation_checkpointing"] is False
    assert "needs CUDA" in row["specforge"]["skipped"] and "ratio" not in row
    # the same shards and TrainConfig through the product's entry point: the same two losses, step by step
    cfg = {**ours["config"], "output": str(tmp_path / "run")}
    run(TrainConfig.from_dict(cfg), {"path": str(out / "work" / "tiny" / "target")})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]
    assert len(logged) == 2 and ours["losses"] == pytest.approx(logged, rel=1e-6)
    assert ours["losses"][0] != ours["losses"][1]


def test_settings_reach_the_trainer_and_profile_is_written(tmp_path):
    """--set KEY=VALUE becomes a TrainConfig field of our step (checked by TrainConfig), --profile writes the
    kernel table of one extra step."""
    bench = _bench()
    out = tmp_path / "bench"
    report = bench.main(["--shape", "tiny", "--device", "cpu", "--lengths", "64", "--ttt", "2", "--warmup", "1",
                         "--iters", "1", "--rows", "2", "--profile", "--set", "step_decay=0.5",
                         "--set", "grad_clip=0.25", "--out", str(out)])
    cfg = report["rows"][0]["ours"]["config"]
    assert cfg["step_decay"] == 0.5 and cfg["grad_clip"] == 0.25 and cfg["steps"] == 3
    table = (out / "profile-tiny-64.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    with pytest.raises(ValueError, match="unknown train"):
        bench.bench_config(out, out, 64, 1, "cpu", "auto", 2, bench.parse_settings(["grad_clipp=1"]))
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench.parse_settings(["grad_clip"])
