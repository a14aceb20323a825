"""Checkpoints are code (DCP unpickles): export and evaluation never read DCP files, resume reads only the run's
own folder; every file of a checkpoint is durable before its COMPLETE marker."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stage3_train.checkpoint import MARKER, WEIGHTS_FILE, step_dirs
from stage3_train.config import TrainConfig
from stage3_train.export import WEIGHT_KEYS, export_checkpoint, main as export_main
from stage3_train.model import DraftConfig, Eagle3Draft
from stage3_train.train import run, run_meta
from tests.fixtures.stage3 import TINY, TINY_LAYERS


class _RunsCode:
    """Unpickling this creates `marker`: the payload a crafted checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted_checkpoint(folder: Path, marker: Path, weights: dict[str, torch.Tensor] | None = None,
                        meta: dict | None = None) -> Path:
    """A step folder that looks complete, whose DCP files (`.metadata`, `__0_0.distcp`) run the payload when
    unpickled; with `weights`, also a model.safetensors and meta.json that export can use instead."""
    folder.mkdir(parents=True)
    payload = pickle.dumps(_RunsCode(marker))
    (folder / ".metadata").write_bytes(payload)
    (folder / "__0_0.distcp").write_bytes(payload)
    (folder / "train_state.json").write_text(json.dumps({"step": 1}))
    (folder / MARKER).write_text(json.dumps({"step": 1}) + "\n")
    if weights is not None:
        save_file(weights, str(folder / WEIGHTS_FILE))
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _tiny_draft_state(target_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable state dict without embeddings, run meta) of a random draft for the tiny target."""
    target_cfg = json.loads((Path(target_dir) / "config.json").read_text())
    torch.manual_seed(0)
    model = Eagle3Draft(DraftConfig.from_target_config(target_cfg, 64))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("embed_tokens")}
    return state, run_meta(model.config, target_cfg, TINY_LAYERS, {"name": "tiny"})


def _small_cfg(shards: Path, out: Path, **kw) -> TrainConfig:
    base = dict(input=str(shards), output=str(out), max_tokens=64, pad_multiple=16, ttt_steps=2, steps=2, lr=3e-3,
                warmup_steps=1, log_every=1, eval_every=0, ckpt_every=1, keep_ckpts=5, param_dtype="float32",
                val_fraction=0.1, export=False)
    return TrainConfig(**{**base, **kw})


def test_export_and_eval_refuse_a_crafted_checkpoint_without_running_it(tmp_path):
    from evaluation.offline import load_draft

    marker = tmp_path / "payload-ran"
    ckpt = _crafted_checkpoint(tmp_path / "run/checkpoints/step-1", marker)
    with pytest.raises(ValueError, match=f"no {WEIGHTS_FILE}.*resume"):
        export_checkpoint(ckpt, tmp_path / "out")
    with pytest.raises(ValueError, match=f"no {WEIGHTS_FILE}"):
        export_main([str(tmp_path / "run"), str(tmp_path / "out")])  # a run folder: its latest checkpoint
    with pytest.raises(ValueError, match=f"no {WEIGHTS_FILE}"):
        load_draft(ckpt, None, torch.device("cpu"), torch.float32)  # eval.draft=CKPT
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_and_eval_read_a_crafted_checkpoint_from_safetensors_only(tmp_path, tiny_stage3):
    from transformers import LlamaConfig, LlamaForCausalLM

    from evaluation.offline import load_draft

    target_dir, _ = tiny_stage3
    marker = tmp_path / "payload-ran"
    state, meta = _tiny_draft_state(target_dir)
    ckpt = _crafted_checkpoint(tmp_path / "step-1", marker, weights=state, meta=meta)
    out = export_checkpoint(ckpt, tmp_path / "export")
    exported = load_file(str(out / "model.safetensors"))
    for key in WEIGHT_KEYS:
        assert torch.equal(exported[key], state[key].to(torch.bfloat16)), key
    assert not marker.exists()

    target = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k != "rope_theta"}))
    draft, config = load_draft(ckpt, target, torch.device("cpu"), torch.float32)
    assert torch.equal(draft.fc.weight, state["fc.weight"].to(torch.bfloat16).float())
    assert torch.equal(draft.embed_tokens.weight, target.get_input_embeddings().weight)
    assert config["draft_vocab_size"] == 64 and not marker.exists()


@pytest.fixture(scope="module")
def trained_run(tiny_stage3, tmp_path_factory) -> Path:
    """A finished 2-step run folder (checkpoints at steps 1 and 2, no export)."""
    _, shards = tiny_stage3
    target_dir, _ = tiny_stage3
    out = tmp_path_factory.mktemp("safety") / "run"
    run(_small_cfg(shards, out), {"path": str(target_dir)})
    return out


def test_resume_refuses_a_checkpoint_linked_in_from_outside(tmp_path, tiny_stage3, trained_run):
    target_dir, shards = tiny_stage3
    marker = tmp_path / "payload-ran"
    outside = _crafted_checkpoint(tmp_path / "elsewhere/step-7", marker)
    linked_folder = tmp_path / "linked_folder"
    shutil.copytree(trained_run, linked_folder)
    (linked_folder / "checkpoints/step-7").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="only from this run's own"):
        run(_small_cfg(shards, linked_folder, steps=8, resume=True), {"path": str(target_dir)})
    # a real folder of the run whose DCP metadata is a link to the crafted one
    linked_file = tmp_path / "linked_file"
    shutil.copytree(trained_run, linked_file)
    meta_file = linked_file / "checkpoints/step-2/.metadata"
    meta_file.unlink()
    meta_file.symlink_to(outside / ".metadata")
    with pytest.raises(ValueError, match=r"its files \['.metadata'\] are links"):
        run(_small_cfg(shards, linked_file, steps=4, resume=True), {"path": str(target_dir)})
    assert not marker.exists()


def test_an_old_checkpoint_without_safetensors_is_refused_and_resuming_exports_it(tmp_path, tiny_stage3,
                                                                                  trained_run):
    target_dir, shards = tiny_stage3
    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    for _, folder in step_dirs(old / "checkpoints"):
        (folder / WEIGHTS_FILE).unlink()  # as written before checkpoints carried the weights as safetensors
    with pytest.raises(ValueError, match=r"train.steps=<its step>"):
        export_checkpoint(old, tmp_path / "x")
    # the advice of the message: resume the run at its last step; the trainer (DCP, its own folder) exports
    result = run(_small_cfg(shards, old, steps=2, resume=True, export=True), {"path": str(target_dir)})
    assert result["step"] == 2 and (old / "export/model.safetensors").is_file()
    fresh = export_checkpoint(trained_run, tmp_path / "fresh")  # the same step from the original's safetensors
    a, b = load_file(str(old / "export/model.safetensors")), load_file(str(fresh / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_file_is_durable_before_its_marker(tmp_path, tiny_stage3, monkeypatch):
    """Each file of a step folder was fsynced (itself, or as the temp file renamed onto it) before COMPLETE was
    renamed into place: a power cut after the marker cannot leave a torn rng-*.safetensors or weights file."""
    target_dir, shards = tiny_stage3
    durable: set[str] = set()
    at_marker: dict[str, set[str]] = {}
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        real_fsync(fd)
        durable.add(os.readlink(f"/proc/self/fd/{fd}"))

    def moved(real):
        def move(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            src, dst = str(Path(src).resolve()), Path(dst).resolve()
            if src in durable:
                durable.add(str(dst))
            if dst.name == MARKER:
                at_marker[str(dst.parent)] = set(durable)
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "rename", moved(real_rename))
    out = tmp_path / "run"
    run(_small_cfg(shards, out), {"path": str(target_dir)})
    monkeypatch.undo()
    folders = [p for _, p in step_dirs(out / "checkpoints")]
    assert len(folders) == 2
    for folder in folders:
        files = {str(p.resolve()) for p in folder.iterdir() if p.name != MARKER}
        assert {"rng-0.safetensors", WEIGHTS_FILE, ".metadata"} <= {Path(f).name for f in files}
        assert files - at_marker[str(folder.resolve())] == set()
