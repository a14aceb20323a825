"""Stage 3 training loop on a tiny target (CPU, gloo, 1 process): outputs, resume equality, refusals, NaN stop."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from stage3_train.checkpoint import MARKER, prune, step_dirs
from stage3_train.config import TrainConfig
from stage3_train.data import check_manifest, split_rows
from stage3_train.metrics import StepStats, acceptance_length
from stage3_train.train import lr_factor, run
from tests.fixtures.stage3 import TINY, TINY_LAYERS, make_tiny_target, tiny_rows

REPO = Path(__file__).resolve().parent.parent


def small_cfg(shards: Path, out: Path, **kw) -> TrainConfig:
    base = dict(input=str(shards), output=str(out), max_tokens=64, pad_multiple=16, ttt_steps=3, steps=6, lr=3e-3,
                warmup_steps=2, log_every=1, eval_every=0, ckpt_every=3, keep_ckpts=5, param_dtype="float32",
                val_fraction=0.1, export=False)
    return TrainConfig(**{**base, **kw})


def train_records(out: Path, kind: str = "train") -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_schedule_and_acceptance_formula():
    assert lr_factor(0, 2, 10, 0.1) == 0.5 and lr_factor(1, 2, 10, 0.1) == 1.0
    assert lr_factor(10, 2, 10, 0.1) == pytest.approx(0.1) and 0.1 < lr_factor(6, 2, 10, 0.1) < 1.0
    assert acceptance_length([0.8, 0.7]) == pytest.approx(1 + 0.8 + 0.8 * 0.7)
    assert acceptance_length([0.0, 1.0]) == 1.0 and acceptance_length([1.0] * 3) == 4.0
    # loss = sum_i 0.8^i ce_i / valid_i
    f64 = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    stats = StepStats(ce_sum=f64(4.0, 6.0), correct=f64(3.0, 1.0), valid=f64(4.0, 2.0), tokens=f64(10.0)[0],
                      sq_tokens=f64(50.0)[0])
    m = stats.summarize(0.8)
    assert m["loss"] == pytest.approx(4 / 4 + 0.8 * 6 / 2) and m["acc"] == [0.75, 0.5]
    # one flat tensor across ranks; sums of micro-batches add field by field
    assert (stats + stats).flat().tolist() == [8.0, 12.0, 6.0, 2.0, 8.0, 4.0, 20.0, 100.0]
    assert StepStats.from_flat(stats.flat(), 2).summarize(0.8) == m


def test_manifest_mismatch_is_refused():
    target = {"hidden_size": 32, "vocab_size": 96, "num_hidden_layers": 8}
    good = {"hidden_size": 32, "vocab_size": 96, "layer_ids": [2, 4, 5], "num_aux_layers": 3}
    assert check_manifest(good, target, None, "d") == [2, 4, 5]
    with pytest.raises(ValueError, match="hidden_size 64 in the shards, 32 in the target"):
        check_manifest({**good, "hidden_size": 64}, target, None, "d")
    with pytest.raises(ValueError, match="vocab_size"):
        check_manifest({**good, "vocab_size": 100}, target, None, "d")
    with pytest.raises(ValueError, match="num_aux_layers"):
        check_manifest({**good, "num_aux_layers": 4}, target, None, "d")
    with pytest.raises(ValueError, match="the shards' layer_ids"):  # the engines' rule: no id 0
        check_manifest({**good, "layer_ids": [0, 4, 5]}, target, None, "d")
    assert check_manifest({**good, "layer_ids": [1, 2], "num_aux_layers": 2}, target, [1, 2], "d") == [1, 2]


def test_layer_ids_come_from_the_shards_unless_configured():
    """train.layer_ids=null takes the manifest's ids (not the engines' default); a configured list must match."""
    target = {"hidden_size": 32, "vocab_size": 96, "num_hidden_layers": 8}
    shards = {"hidden_size": 32, "vocab_size": 96, "layer_ids": [1, 3, 6], "num_aux_layers": 3}
    assert check_manifest(shards, target, None, "data/hidden/x") == [1, 3, 6]
    assert check_manifest(shards, target, [1, 3, 6], "data/hidden/x") == [1, 3, 6]
    with pytest.raises(ValueError) as refused:
        check_manifest(shards, target, [2, 4, 5], "data/hidden/x")
    assert "train.layer_ids=[2, 4, 5]" in str(refused.value) and "layer_ids [1, 3, 6]" in str(refused.value)
    assert "data/hidden/x/manifest.json" in str(refused.value)


def test_no_training_preset_carries_layer_ids():
    """The ids belong to the shards a target's stage 2 wrote, not to a training recipe."""
    for preset in sorted((REPO / "conf" / "preset").glob("*.yaml")):
        train = (yaml.safe_load(preset.read_text()) or {}).get("train") or {}
        assert "layer_ids" not in train, preset.name


def test_epochs_count_the_steps_when_steps_is_null():
    """train.steps=null: epochs x the loader's micro-batches per epoch, over grad_accum (at least one step)."""
    assert TrainConfig(epochs=0.5).with_step_count(10).steps == 5
    assert TrainConfig(epochs=3, grad_accum=4).with_step_count(10).steps == 7   # 30 micro-batches -> 7 full steps
    assert TrainConfig(epochs=0.01).with_step_count(10).steps == 1
    assert TrainConfig(steps=9, epochs=3).with_step_count(10).steps == 9        # a configured count wins
    with pytest.raises(ValueError, match="train.epochs must be > 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="train.steps must be >= 1 or null"):
        TrainConfig(steps=0)


def test_a_run_with_epochs_trains_that_many_passes(tmp_path, tiny_stage3):
    from stage3_train.data import PackedLoader, open_shards, split_rows

    target, shards = tiny_stage3
    cfg = small_cfg(shards, tmp_path / "run", steps=None, epochs=2, grad_accum=2, ckpt_every=0)
    ds = open_shards(str(shards), True)
    train_idx, _ = split_rows([str(ds[i]["id"]) for i in range(len(ds))], cfg.val_fraction)
    per_epoch = PackedLoader(ds, train_idx, max_tokens=64, batch_rows=1, rank=0, world_size=1, seed=0,
                             pad_multiple=16).steps_per_epoch()
    assert per_epoch > 2
    result = run(cfg, {"path": str(target)})
    assert result["step"] == per_epoch  # 2 passes of per_epoch micro-batches, 2 micro-batches a step
    assert train_records(tmp_path / "run")[-1]["step"] == per_epoch


def test_rows_take_the_shards_max_length_unless_configured(tmp_path, tiny_stage3):
    """train.max_tokens=null: rows as long as the length stage 2 cut the conversations to (manifest max_length)."""
    assert TrainConfig(max_tokens=None).with_row_length({"max_length": 4096}).max_tokens == 4096
    assert TrainConfig(max_tokens=512).with_row_length({"max_length": 4096}).max_tokens == 512
    with pytest.raises(ValueError, match="records no max_length.*set train.max_tokens"):
        TrainConfig(max_tokens=None).with_row_length({})
    target, shards = tiny_stage3
    run(small_cfg(shards, tmp_path / "run", max_tokens=None, steps=2, ckpt_every=2), {"path": str(target)})
    state = json.loads((tmp_path / "run/checkpoints/step-2/train_state.json").read_text())
    assert state["config"]["max_tokens"] == json.loads((shards / "manifest.json").read_text())["max_length"] == 64


def test_run_refuses_another_targets_shards(tmp_path, tiny_stage3):
    _, shards = tiny_stage3
    other = make_tiny_target(tmp_path / "other")
    cfg_file = other / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "hidden_size": 48}))
    with pytest.raises(ValueError, match="do not match the configured target"):
        run(small_cfg(shards, tmp_path / "run"), {"path": str(other)})
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_short_run_writes_metrics_checkpoints_plot_export(tmp_path, tiny_stage3):
    target, shards = tiny_stage3
    out = tmp_path / "run"
    result = run(small_cfg(shards, out, steps=4, ckpt_every=2, keep_ckpts=1, eval_every=2, export=True),
                 {"path": str(target)})
    assert result["step"] == 4 and Path(result["export"]).joinpath("model.safetensors").is_file()
    recs = train_records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert len(r["acc"]) == 3 and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["lr"] > 0
        assert r["accept_len"] == pytest.approx(acceptance_length(r["acc"]))
    assert [r["step"] for r in train_records(out, "val")] == [2, 4]
    assert [s for s, _ in step_dirs(out / "checkpoints")] == [4]  # keep_ckpts=1 pruned step-2
    assert (out / "checkpoints/step-4" / MARKER).is_file()
    assert (out / "curves.png").stat().st_size > 10_000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="train.resume=true"):  # a second run must not clobber the first
        run(small_cfg(shards, out, steps=4), {"path": str(target)})


def test_resume_gives_the_uninterrupted_losses(tmp_path, tiny_stage3):
    target, shards = tiny_stage3
    full = tmp_path / "full"
    run(small_cfg(shards, full, steps=6, ckpt_every=3, grad_accum=2), {"path": str(target)})
    # the interrupted run: everything the full run had written when it saved step 3
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints/step-6")
    (cut / "checkpoints/step-9").mkdir()  # an unfinished save (no marker) is ignored
    run(small_cfg(shards, cut, steps=6, ckpt_every=3, grad_accum=2, resume=True), {"path": str(target)})
    a, b = train_records(full), train_records(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a[3:], b[3:]):
        assert rb["loss"] == ra["loss"] and rb["acc"] == ra["acc"], (ra, rb)
    assert a[0]["loss"] != a[5]["loss"]
    # the unfinished step-9 was newer than every complete checkpoint: the save of step 6 pruned it
    assert [s for s, _ in step_dirs(cut / "checkpoints", complete_only=False)] == [3, 6]


def test_prune_keeps_the_newest_complete_and_drops_every_unmarked_folder(tmp_path):
    def folder(step: int, complete: bool) -> None:
        (tmp_path / f"step-{step}").mkdir()
        if complete:
            (tmp_path / f"step-{step}" / MARKER).write_text("{}")

    prune(tmp_path, keep=1)  # no folder at all: nothing to do
    folder(3, complete=False)
    prune(tmp_path, keep=1)  # nothing complete: an unmarked folder is all there is of the run, it stays
    assert [s for s, _ in step_dirs(tmp_path, complete_only=False)] == [3]
    for step, complete in ((2, True), (4, True), (5, False), (6, True), (9, False), (12, False)):
        folder(step, complete)
    (tmp_path / "notes").mkdir()  # not a checkpoint folder: never touched
    prune(tmp_path, keep=2)
    assert [s for s, _ in step_dirs(tmp_path, complete_only=False)] == [4, 6]
    prune(tmp_path, keep=1)
    assert [s for s, _ in step_dirs(tmp_path, complete_only=False)] == [6] and (tmp_path / "notes").is_dir()


def test_nan_loss_stops_naming_step_and_batch(tmp_path, tiny_stage3):
    from tests.fixtures.shards import write_shards

    target, _ = tiny_stage3
    rows = list(tiny_rows(12, seed=5))
    rows[7]["hidden"] = torch.full_like(rows[7]["hidden"], float("nan"))
    shards = tmp_path / "nan_shards"
    write_shards(shards, rows, {"layer_ids": TINY_LAYERS, "hidden_size": TINY["hidden_size"],
                                "vocab_size": TINY["vocab_size"]}, draft_vocab_size=64)
    out = tmp_path / "run"
    cfg = small_cfg(shards, out, steps=50, ckpt_every=1, keep_ckpts=100, val_fraction=0.0, max_tokens=40)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step (\d+).*conv-5-7") as err:
        run(cfg, {"path": str(target)})
    bad_step = int(str(err.value).split("step ")[1].split()[0])
    saved = step_dirs(out / "checkpoints", complete_only=False)
    assert all((p / MARKER).is_file() for _, p in saved)
    assert [s for s, _ in saved] == list(range(1, bad_step))  # every good step saved, nothing for the bad one


def test_nan_validation_loss_stops_naming_step_before_save_and_export(tmp_path, tiny_stage3):
    from tests.fixtures.shards import write_shards

    target, _ = tiny_stage3
    rows = list(tiny_rows(12, seed=5))
    _, val_idx = split_rows([r["id"] for r in rows], 0.1)
    bad = rows[val_idx[0]]  # a held-out row only: training itself stays finite
    bad["hidden"] = torch.full_like(bad["hidden"], float("nan"))
    shards = tmp_path / "nan_val_shards"
    write_shards(shards, rows, {"layer_ids": TINY_LAYERS, "hidden_size": TINY["hidden_size"],
                                "vocab_size": TINY["vocab_size"]}, draft_vocab_size=64)
    out = tmp_path / "run"
    cfg = small_cfg(shards, out, steps=6, eval_every=2, ckpt_every=1, max_tokens=40, export=True)
    with pytest.raises(FloatingPointError, match=rf"non-finite validation loss at step 2: .*{bad['id']}"):
        run(cfg, {"path": str(target)})
    assert [s for s, _ in step_dirs(out / "checkpoints", complete_only=False)] == [1]  # nothing for step 2
    assert not (out / "export").exists() and train_records(out, "val") == []
    assert [r["step"] for r in train_records(out)] == [1, 2]


def test_auto_activation_checkpointing_decides_from_what_fits():
    from stage3_train.model import MLP_CHUNK_TOKENS, DraftConfig
    from stage3_train.parallelize import activation_bytes_per_token, needs_recompute

    llama = DraftConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        intermediate_size=14336, vocab_size=128256, draft_vocab_size=32000, target_hidden_size=4096)
    # 2 * (8*4096 + 2*4096 + 2*1024 + 3*14336) + 4*32 bytes per token per TTT step
    assert activation_bytes_per_token(llama) == 172_160
    h200_free, h100_free, states = 139 * 2**30, 78 * 2**30, 12 * 425_000_000  # fp32 grads + AdamW moments
    kw = dict(ttt_steps=7, state_bytes=states, mlp_chunk_tokens=MLP_CHUNK_TOKENS)
    assert not needs_recompute(llama, tokens=32768, free_bytes=h200_free, **kw)  # a 32K row trains without
    assert needs_recompute(llama, tokens=32768, free_bytes=24 * 2**30, **kw)     # ... not on a 24 GB card
    assert not needs_recompute(llama, tokens=16384, free_bytes=h100_free, **kw)
    assert needs_recompute(llama, tokens=262144, free_bytes=h200_free, **kw)
    # CPU (no free-memory figure): off for short rows, on for long ones
    assert not needs_recompute(llama, tokens=2048, free_bytes=None, ttt_steps=7)
    assert needs_recompute(llama, tokens=65536, free_bytes=None, ttt_steps=7)
    with pytest.raises(ValueError, match="true, false or auto"):
        TrainConfig(activation_checkpointing="sometimes")
