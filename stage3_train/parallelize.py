"""Parallelism for the draft, in one function applied in a fixed order (torchtitan's `parallelize_llama`).

1. Activation checkpointing is a flag, not a wrapper: `ttt_forward(..., checkpoint=True)` recomputes each TTT
   step's decoder layer in backward (the model's `forward(checkpoint=...)`), so it is returned here for the loop.
2. No torch.compile of the whole step (variable packed lengths would recompile); the attention kernel inside
   the core is the only compiled/fused part.
3. FSDP2: `fully_shard` the decoder layer (`midlayer`), then the root (fc, norm, lm_head), with
   MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). The sharded parameters stay fp32, so the AdamW
   state built on them is fp32 (the master copy); compute sees bf16 all-gathered copies.
   The frozen `embed_tokens` (the target's, V x H) is left out of FSDP (`ignored_params`): replicated in the
   compute dtype, never all-gathered, no gradient, no optimizer state.
   `reshard_after_forward=False` for the layer: TTT calls it k times per step, and one layer's bf16 copy is
   small, so it stays gathered through forward instead of k all-gathers (ZeRO-2-like for the layer).
4. Gradient reduction sums instead of averaging over ranks (`set_gradient_divide_factor(1)` with plain SUM
   collectives, which gloo also has): the loss is
   already normalised by the globally reduced count of valid positions, so the global gradient is the sum of
   the per-rank gradients.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parallelize(model: nn.Module, *, mesh: DeviceMesh, param_dtype: str = "bfloat16",
                activation_checkpointing: bool = True, reshard_layer_after_forward: bool = False) -> bool:
    """Shard `model` (an Eagle3Draft on its device, fp32 params) in place; returns the activation-checkpointing
    flag to pass to `ttt_forward`."""
    dtype = DTYPES[param_dtype]
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    frozen = {p for p in model.parameters() if not p.requires_grad}
    for p in frozen:
        p.data = p.data.to(dtype)  # frozen embeddings: compute dtype, replicated
    fully_shard(model.midlayer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_layer_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # per FSDP unit: sum over ranks, do not average
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM; NCCL zero-copy)
    return activation_checkpointing
