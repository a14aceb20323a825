"""Checkpoints with torch.distributed.checkpoint (DCP) in `<out>/checkpoints/step-N/`, latest k kept.

A folder holds the DCP shards of {"model", "optim"} (sharded FSDP2 state, frozen params left out: the embeddings
are the target's and reloaded from it), `model.safetensors` (the same model weights, full and unsharded, fp32,
gathered on rank 0), `train_state.json` (step, LR schedule, data loader position, config), `meta.json` (what
export needs: draft and target configs, layer ids), one `rng-<rank>.safetensors` per rank, and last the
completion marker `COMPLETE`, written atomically by rank 0 after every rank's files were fsynced. A folder without
the marker (a crash mid-save) is ignored on resume and deleted at the next save (torchtitan's `.metadata` rule,
made explicit).

Trust: DCP reads `.metadata` with `pickle` and non-tensor items with `torch.load(weights_only=False)`, so
loading a DCP folder runs whatever code it carries. Only `load` (resume) reads DCP, and only from this run's own
`checkpoints/` folder (no links out of it). Export and evaluation read `model.safetensors` and the JSON files,
never the DCP shards, so a checkpoint folder from elsewhere cannot run code through them.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from common.files import atomic_save_file, atomic_write_text, fsync_dir

MARKER = "COMPLETE"
WEIGHTS_FILE = "model.safetensors"
_STEP_RE = re.compile(r"^step-(\d+)$")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# rank 0 gets the whole model on the CPU (other ranks an empty dict): what export and evaluation read
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Temp name, fsync, rename, fsync of the folder: on disk before the marker that declares it complete."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_save_file(path, lambda tmp: save_file(tensors, tmp))


def step_dirs(root: Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return sorted((s, p) for s, p in found if not complete_only or (p / MARKER).is_file())


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None."""
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         train_state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the folder; prunes to the latest `keep` complete ones."""
    folder = Path(root) / f"step-{step}"
    if _rank() == 0 and folder.exists():
        shutil.rmtree(folder)  # an incomplete earlier attempt at this step
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))  # fsyncs its files itself
    weights = get_model_state_dict(model, options=_FULL_ON_RANK0)  # collective all-gather of the shards
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    _save_safetensors(folder / f"rng-{_rank()}.safetensors", rng)
    if _rank() == 0:
        _save_safetensors(folder / WEIGHTS_FILE, weights)
        atomic_write_text(folder / "train_state.json", json.dumps({"step": step, **train_state}, indent=1))
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
    del weights
    _barrier()  # every rank's files are durable before the marker
    if _rank() == 0:
        atomic_write_text(folder / MARKER, json.dumps({"step": step}) + "\n")
        fsync_dir(root)  # the step-N entry itself, before prune deletes the older ones
        prune(root, keep)
    _barrier()
    return folder


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0: keep all), and every folder without the
    marker, older or newer than the newest complete one (a crash mid-save left it; resume never reads it).

    Rank 0 calls it after a save completed and every rank passed the barrier, so no folder is being written.
    With no complete checkpoint nothing is deleted: an unmarked folder is then all there is of the run."""
    complete = step_dirs(root)
    if not complete:
        return
    for _, p in complete[:-keep] if keep > 0 else []:  # keep >= 1: the newest complete one always stays
        shutil.rmtree(p, ignore_errors=True)
    for _, p in step_dirs(root, complete_only=False):
        if not (p / MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)


def check_inside(folder: Path, root: Path) -> None:
    """Refuse to unpickle (DCP) anything but a real folder directly in this run's `root` whose files are no links:
    a link could bring in a checkpoint from elsewhere, and loading DCP runs the code a checkpoint carries."""
    folder, root = Path(folder), Path(root)
    links = [p.name for p in folder.iterdir() if p.is_symlink()] if folder.is_dir() else []
    if folder.is_symlink() or folder.resolve().parent != root.resolve() or links:
        what = f"its files {links} are links" if links else f"it resolves to {folder.resolve()}"
        raise ValueError(f"train.resume loads DCP checkpoints (pickle: they run code) only from this run's own "
                         f"{root}, and {folder} is not one ({what}). To continue from another run's weights, "
                         f"export them (python -m stage3_train.export CKPT OUT) and set train.init_from=OUT")


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, root: Path) -> dict[str, Any]:
    """Collective: restore model, optimizer and this rank's RNG from `folder`, a complete checkpoint inside this
    run's checkpoint folder `root` (`check_inside`); returns train_state.json."""
    folder = Path(folder)
    check_inside(folder, root)
    if not (folder / MARKER).is_file():
        raise ValueError(f"{folder} has no {MARKER} marker: not a complete checkpoint")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    rng_file = folder / f"rng-{_rank()}.safetensors"
    if rng_file.is_file():  # absent when resuming with more ranks: those start from their seeded state
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((folder / "train_state.json").read_text())


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full model tensors of a complete checkpoint (`fc.weight`, `midlayer...`, `d2t`, ...; no frozen
    embeddings), from its `model.safetensors` only: never from the DCP shards, which would run the code a
    checkpoint from elsewhere carries. No process group needed (export, evaluation)."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise ValueError(f"{folder} is not a complete checkpoint (no {MARKER} marker)")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} has no {WEIGHTS_FILE} (a checkpoint written before checkpoints carried one). Export and "
            f"evaluation read weights only from safetensors, never from DCP files (unpickling runs code). If it is "
            f"your own run's latest checkpoint, resume that run with its settings and train.steps=<its step> "
            f"(train.output=RUN train.resume=true): the trainer loads it and writes RUN/export, which loads anywhere")
    return load_file(str(path))


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "meta.json").read_text())
