"""Parallelism and kernel choices for the draft, in one function applied in a fixed order (torchtitan's
`parallelize_llama`). The trainer and benchmarks/bench_stage3.py both go through it, so what is timed is what trains.

1. Kernels: on CUDA, `compile_hot_paths()` (torch.compile of the small elementwise pieces: norms, RoPE, SwiGLU,
   the attention's diagonal terms, the loss's softmax), once per process. The CPU stays eager (tests). No
   torch.compile of the whole step (variable packed lengths would recompile).
2. FSDP2: `fully_shard` the decoder layer (`midlayer`), then the root (fc, norm, lm_head), with
   MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). The sharded parameters stay fp32, so the AdamW
   state built on them is fp32 (the master copy); compute sees bf16 all-gathered copies.
   The frozen `embed_tokens` (the target's, V x H) is left out of FSDP (`ignored_params`): replicated in the
   compute dtype, never all-gathered, no gradient, no optimizer state.
   `reshard_after_forward=False` for the layer: TTT calls it k times per step, and one layer's bf16 copy is
   small, so it stays gathered through forward instead of k all-gathers (ZeRO-2-like for the layer).
   Gradient reduction sums instead of averaging over ranks (`set_gradient_divide_factor(1)` with plain SUM
   collectives, which gloo also has): the loss is already normalised by the globally reduced count of valid
   positions, so the global gradient is the sum of the per-rank gradients.
   `train.cpu_offload`: both units get FSDP2's `CPUOffloadPolicy` (sharded fp32 params, their gradients and so the
   AdamW state in pinned host memory; all-gather copies to the GPU for compute, gradients back after the
   reduce-scatter); the optimizer step then runs on the CPU.
3. Activation checkpointing is a flag, not a wrapper: `ttt_forward(..., checkpoint=True)` recomputes each TTT
   step's decoder layer in backward. `auto` decides it here, after sharding, from what fits
   (`activation_bytes_per_token` vs the free device memory); the flag is returned for the loop.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from common.logs import get_logger

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
FREE_MEMORY_FRACTION = 0.8  # auto recompute: activations + states may use this share of the free memory
CPU_AUTO_MAX_TOKENS = 8192  # auto on the CPU: no recompute up to this many tokens per micro-batch
_COMPILED = {"done": False}
log = get_logger("stage3")


def activation_bytes_per_token(cfg, compute_bytes: int = 2, mlp_chunk_tokens: int | None = None,
                               tokens: int = 0) -> int:
    """Bytes that ONE TTT step keeps for backward per token, without recomputation (compute dtype, compiled norms).

    Per token, with H = hidden, Hq/Hkv heads of width D, I = intermediate, b = compute_bytes:
        hidden_norm input g, input_layernorm input (embeddings)       2H
        x = cat[emb, hidden] (q/k/v input)                           2H
        q after RoPE, attention output (o_proj input)                2 Hq D
        k, v (also the TTT cache of later steps)                     2 Hkv D
        post-attention norm input, MLP input, final norm input, lm_head input   4H
        SwiGLU gate, up (silu_mul inputs), down_proj input           3I  (0 when the MLP runs in recomputed
                                                                          token chunks: rows > MLP_CHUNK_TOKENS)
      -> b * (8H + 2 Hq D + 2 Hkv D + 3I) + 4 Hq (the fp32 log-sum-exp per query head).
    Llama-3.1-8B shape (4096, 32/8 x 128, 14336): 172 KB per token per step, 1.2 MB per token for 7 steps: 16K
    tokens -> 19.7 GB, which matches the 21.2 GiB measured without recompute (benchmarks/RESULTS.md, incl. weights).
    """
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    mlp = 0 if mlp_chunk_tokens is not None and tokens > mlp_chunk_tokens else 3 * I
    return compute_bytes * (8 * H + 2 * Hq * D + 2 * Hkv * D + mlp) + 4 * Hq


def needs_recompute(cfg, *, tokens: int, ttt_steps: int, free_bytes: int | None, state_bytes: int = 0,
                    compute_bytes: int = 2, mlp_chunk_tokens: int | None = None) -> bool:
    """`train.activation_checkpointing=auto`: recompute only when the activations would not fit.

    need = tokens * ttt_steps * activation_bytes_per_token + the per-token step inputs (fc input 3 H_t, ~ids) kept
    for the step + one more step's activations as backward temporaries + state_bytes (gradients and AdamW moments
    not allocated yet). Recompute iff need > FREE_MEMORY_FRACTION * free_bytes. free_bytes None (CPU): recompute
    only above CPU_AUTO_MAX_TOKENS tokens.
    """
    if free_bytes is None:
        return tokens > CPU_AUTO_MAX_TOKENS
    per_step = activation_bytes_per_token(cfg, compute_bytes, mlp_chunk_tokens, tokens)
    inputs = compute_bytes * cfg.num_aux_layers * cfg.target_hidden_size + 64
    need = tokens * ((ttt_steps + 1) * per_step + inputs) + state_bytes
    return need > FREE_MEMORY_FRACTION * free_bytes


def _choose_recompute(model: nn.Module, setting, tokens: int, ttt_steps: int, dtype: torch.dtype,
                      world_size: int, device: torch.device, states_on_device: bool = True) -> bool:
    if setting in (True, False):
        return bool(setting)
    from stage3_train.model import MLP_CHUNK_TOKENS

    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # fp32 grads + AdamW exp_avg + exp_avg_sq, sharded; none of it on the device with cpu_offload
    state = 3 * 4 * trainable // world_size if states_on_device else 0
    cfg = model.config
    ac = needs_recompute(cfg, tokens=tokens, ttt_steps=ttt_steps, free_bytes=free, state_bytes=state,
                         compute_bytes=dtype.itemsize, mlp_chunk_tokens=MLP_CHUNK_TOKENS)
    per_token = ttt_steps * activation_bytes_per_token(cfg, dtype.itemsize, MLP_CHUNK_TOKENS, tokens)
    free_txt = f"{free / 2**30:.1f} GiB free" if free is not None else "CPU"
    log.info(f"activation checkpointing auto -> {'on' if ac else 'off'}: {tokens} tokens x "
             f"{per_token / 2**20:.2f} MiB/token = {tokens * per_token / 2**30:.1f} GiB of activations, {free_txt}")
    return ac


def compile_kernels(device: torch.device) -> None:
    """Step 1: the compiled elementwise kernels on CUDA, once per process (the CPU stays eager)."""
    if device.type != "cuda" or _COMPILED["done"]:
        return
    from stage3_train.model import compile_hot_paths

    compile_hot_paths()
    _COMPILED["done"] = True


def parallelize(model: nn.Module, *, mesh: DeviceMesh, param_dtype: str = "bfloat16",
                activation_checkpointing: bool | str = "auto", tokens_per_micro_batch: int = 0,
                ttt_steps: int = 1, reshard_layer_after_forward: bool = False, cpu_offload: bool = False) -> bool:
    """Kernels, FSDP2, recompute decision for `model` (an Eagle3Draft on its device, fp32 params), in place and in
    this order; returns the activation-checkpointing flag to pass to `ttt_forward`. tokens_per_micro_batch and
    ttt_steps are what `auto` needs (tokens one rank holds per micro-batch)."""
    device = next(model.parameters()).device  # the compute device (cpu_offload moves the sharded params to host)
    compile_kernels(device)
    dtype = DTYPES[param_dtype]
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    frozen = {p for p in model.parameters() if not p.requires_grad}
    for p in frozen:
        p.data = p.data.to(dtype)  # frozen embeddings: compute dtype, replicated
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    fully_shard(model.midlayer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_layer_after_forward,
                offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=frozen, offload_policy=offload)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # per FSDP unit: sum over ranks, do not average
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM; NCCL zero-copy)
    return _choose_recompute(model, activation_checkpointing, tokens_per_micro_batch, ttt_steps, dtype,
                             mesh.size(), device, states_on_device=not cpu_offload)
