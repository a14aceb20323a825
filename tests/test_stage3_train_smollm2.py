"""A short real run: stage 2 captures SmolLM2's hidden states for a few ShareGPT conversations, stage 3 trains on
them (CPU, 1 process) and the step-0 training accuracy rises well above its start; the export is complete."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stage3_train.config import TrainConfig
from stage3_train.train import run


@pytest.fixture(scope="module")
def smollm2_shards(smollm2_dir, tmp_path_factory) -> Path:
    """Shards of 24 ShareGPT conversations (<= 256 tokens each) captured from the real SmolLM2 by stage 2."""
    from common.target import TargetSpec as TargetConfig
    from stage2_hidden.config import HiddenConfig
    from stage2_hidden.pipeline import run as capture

    out = tmp_path_factory.mktemp("smollm2_shards")
    target = TargetConfig(name="smollm2-135m", path=str(smollm2_dir), dtype="float32")
    hidden = HiddenConfig(input="wheel:sharegpt", output=str(out), num_prompts=40, max_length=256,
                          on_too_long="truncate", batch_tokens=2048, rows_per_shard=16, draft_vocab_size=2048,
                          device="cpu")
    capture(target, hidden)
    return out


@pytest.mark.slow
def test_short_smollm2_run_learns(tmp_path, smollm2_dir, smollm2_shards):
    cfg = TrainConfig(input=str(smollm2_shards), output=str(tmp_path / "run"), max_tokens=512, pad_multiple=64,
                      ttt_steps=2, steps=40, lr=2e-3, warmup_steps=4, log_every=4, eval_every=20, ckpt_every=20,
                      param_dtype="float32", val_fraction=0.1, activation_checkpointing=True)
    result = run(cfg, {"path": str(smollm2_dir), "name": "smollm2-135m"})
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    first, last = train[0]["acc"][0], max(r["acc"][0] for r in train[-3:])
    print(f"step-0 accuracy {first:.3f} -> {last:.3f}; losses {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}")
    assert last > first + 0.15 and last > 2 * first, train
    assert train[-1]["loss"] < train[0]["loss"]
    export = Path(result["export"])
    config = json.loads((export / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["draft_vocab_size"] == 2048 and config["hidden_size"] == 576
    assert (tmp_path / "run/curves.png").is_file()
