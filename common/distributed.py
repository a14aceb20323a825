"""Distributed start-up for every stage: the process group, the device, and the one named ("dp", "sp") mesh.

    world = init_world(device="auto", sp_size=1)     # torchrun's env:// group, or a 1-rank in-memory group
    world.mesh["sp"]                                 # the ranks sharing one row (sequence parallelism)
    world.fsdp_mesh                                  # dp x sp flattened: FSDP2 shards over the whole world
    world.close()

The mesh is torchtitan's `ParallelDims.world_mesh`: built once here, sp innermost (an SP group is N consecutive
ranks, one node); everything else takes sub-meshes from it. Run without torchrun, a 1-rank group over an
in-memory store (no port, no environment changes) gives one process the same code path as N.

Device convention (`resolve_device`): "auto" / None = cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" =
cuda:LOCAL_RANK; "cuda:N" and "cpu" as written (several ranks may share cuda:0: stage 2 for a small target).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(pref: str | None) -> torch.device:
    if pref in (None, "auto"):
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {pref!r} asked for but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank())
    elif device.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {pref!r}")
    return device


@dataclass
class World:
    rank: int
    world_size: int
    device: torch.device
    mesh: object                # DeviceMesh ("dp", "sp")
    owns_group: bool            # this process created the group (so close() destroys it)

    def __post_init__(self) -> None:
        sp, dp = self.mesh["sp"], self.mesh["dp"]
        self.sp_size, self.sp_rank = sp.size(), sp.get_local_rank()
        self.dp_size, self.dp_rank = dp.size(), dp.get_local_rank()

    @property
    def fsdp_mesh(self):
        """dp x sp flattened into one dimension: FSDP2 shards parameters over every rank."""
        if self.sp_size == 1:
            return self.mesh["dp"]
        return self.mesh["dp", "sp"]._flatten("dp_sp")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_world(device: str | None = "auto", sp_size: int = 1, backend: str | None = None,
               timeout: datetime.timedelta | None = None) -> World:
    """Join (or create) the process group and build the mesh. backend None = NCCL on CUDA, gloo on CPU; stage 2
    passes gloo because its ranks may share one GPU (NCCL refuses that). An initialised group is reused."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs = {"timeout": timeout} if timeout else {}
        if "RANK" in os.environ:
            dist.init_process_group(backend, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    mesh = build_mesh(sp_size, "cpu" if dist.get_backend() == "gloo" else dev.type)
    return World(dist.get_rank(), dist.get_world_size(), dev, mesh, owns)


def build_mesh(sp_size: int, device_type: str):
    """The ("dp", "sp") mesh over the initialised process group (sp innermost); the only mesh of the project."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"train.sequence_parallel={sp_size} must be >= 1 and divide the world size {world}")
    return init_device_mesh(device_type, (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
