"""Checkpoints with torch.distributed.checkpoint (DCP) in `<out>/checkpoints/step-N/`, latest k kept.

A folder holds the DCP shards of {"model", "optim"} (sharded FSDP2 state, frozen params left out: the embeddings
are the target's and reloaded from it), `train_state.json` (step, LR schedule, data loader position, config),
`meta.json` (what export needs: draft and target configs, layer ids), one `rng-<rank>.safetensors` per rank, and
last the completion marker `COMPLETE`, written atomically by rank 0 after every rank finished. A folder without
the marker (a crash mid-save) is ignored on resume and overwritten or pruned later (torchtitan's `.metadata` rule,
made explicit).
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from common.files import atomic_write_text

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(folder / f"rng-{_rank()}.safetensors"))
    if _rank() == 0:
        atomic_write_text(folder / "train_state.json", json.dumps({"step": step, **train_state}, indent=1))
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
    _barrier()  # every rank's files are on disk before the marker
    if _rank() == 0:
        atomic_write_text(folder / MARKER, json.dumps({"step": step}) + "\n")
        prune(root, keep)
    _barrier()
    return folder


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest."""
    complete = step_dirs(root)
    for _, p in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    newest = complete[-1][0] if complete else -1
    for s, p in step_dirs(root, complete_only=False):
        if s < newest and not (p / MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: restore model, optimizer and this rank's RNG from `folder`; returns train_state.json."""
    folder = Path(folder)
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


def load_model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a checkpoint, in one process without a process group (for export).

    Keys are the model's state-dict names (`fc.weight`, `midlayer...`, `d2t`, ...), as saved under "model.".
    """
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise ValueError(f"{folder} is not a complete checkpoint (no {MARKER} marker)")
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    tensors: dict[str, torch.Tensor] = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            tensors[key[len("model."):]] = torch.empty(md.size, dtype=md.properties.dtype)
    state = {"model": dict(tensors)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state["model"]


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "meta.json").read_text())
