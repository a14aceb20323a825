"""Scale-out benchmark of stage-3 training: FSDP2 data parallel and sequence parallel (one row over N GPUs).

    torchrun --nproc-per-node 1 benchmarks/bench_scale.py --mode dp --out dp1.json      # 1, 2, 4 GPUs: the table
    torchrun --nproc-per-node 4 benchmarks/bench_scale.py --mode dp --out dp4.json
    torchrun --nproc-per-node 4 benchmarks/bench_scale.py --mode sp --lengths 262144 524288 1048576 --out sp4.json
    torchrun --nproc-per-node 2 benchmarks/bench_scale.py --mode sp-check --lengths 16384   # SP == 1 GPU, bf16
    torchrun --nproc-per-node 2 benchmarks/bench_scale.py --device cpu --tiny --mode sp-check   # CPU smoke test

Shape: the Llama-3.1-8B-shaped draft of bench_stage3.py (hidden 4096, 32/8 heads, head_dim 128, intermediate
14336, vocab 128256 -> draft 32000, fc 3 x 4096), TTT 7, bf16 FSDP2 params (fp32 master + AdamW), activation
checkpointing, random data with every position valid; `--tiny` = a 32-wide toy for CPU runs.
  dp:       every rank trains its own row of --tokens (8192) tokens; tokens/s = world * tokens / step time.
  sp:       all ranks form one sequence-parallel group and train ONE row of each --lengths; rows are packed from
            conversations of --conv-len tokens (default: the whole row is one conversation), so attention crosses
            every rank border. Results are written after each length (an OOM aborts the launch: keep the earlier ones).
  sp-check: loss and parameter gradients of SP vs the same row on one device (no FSDP, every rank computes both).
argparse only (the GPU stack has no hydra); each result line carries the command, date and device.
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stage3_train.model import DraftConfig, Eagle3Draft  # noqa: E402
from stage3_train.parallelize import compile_kernels, parallelize  # noqa: E402
from stage3_train.sequence_parallel import SPGroup, shard_batch  # noqa: E402
from stage3_train.ttt import PackedBatch, ttt_forward  # noqa: E402

LLAMA_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
                rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
            vocab_size=96, rms_norm_eps=1e-5, max_position_embeddings=1 << 21, rope_theta=10000.0)
GIB = 1024 ** 3


def row(T: int, cfg: DraftConfig, conv_len: int, seed: int, hidden: bool = True) -> PackedBatch:
    """A random packed row on the CPU: conversations of conv_len tokens, all positions valid (identity vocab).
    hidden=False: a zero-stride placeholder (shard_batch copies only the slice; the caller fills it)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T)
    doc, pos = t // conv_len, t % conv_len
    W = cfg.num_aux_layers * cfg.target_hidden_size
    if hidden:
        h = torch.randn(1, T, W, generator=g).to(torch.bfloat16)
    else:
        h = torch.zeros(1, 1, W, dtype=torch.bfloat16).expand(1, T, W)
    return PackedBatch(torch.randint(0, cfg.vocab_size, (1, T), generator=g), h,
                       torch.randint(0, cfg.draft_vocab_size, (1, T), generator=g),
                       torch.ones(1, T, dtype=torch.bool), pos[None], doc[None])


def build(args, device: torch.device, fsdp: bool):
    import warnings

    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")  # see train.py
    cfg = DraftConfig.from_target_config(TINY if args.tiny else LLAMA_8B, draft_vocab_size=64 if args.tiny else 32000)
    torch.manual_seed(0)
    model = Eagle3Draft(cfg).to(device)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        parallelize(model, mesh=init_device_mesh(device.type, (dist.get_world_size(),)),
                    param_dtype="float32" if device.type == "cpu" else "bfloat16",
                    activation_checkpointing=True)  # the steps below pass checkpoint=True
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")
    return model, opt, cfg


def timed_steps(model, opt, batch, shard, args, device, weights) -> dict:
    def step():
        out = ttt_forward(model, batch, weights, args.ttt, checkpoint=True, sp=shard)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else -1.0
    stats = torch.tensor([float(out.loss.detach()), peak], dtype=torch.float64, device=device)
    peak_all = stats[1:].clone()
    dist.all_reduce(stats[:1])
    dist.all_reduce(peak_all, op=dist.ReduceOp.MAX)
    t = torch.tensor(sorted(times)[len(times) // 2], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {"s_per_step": float(t), "loss": float(stats[0]),
            "peak_gib_max_rank": float(peak_all) if device.type == "cuda" else None}


def mode_dp(args, device) -> list[dict]:
    model, opt, cfg = build(args, device, fsdp=True)
    world, T = dist.get_world_size(), args.tokens
    batch = row(T, cfg, args.conv_len or T, seed=dist.get_rank()).to(device)
    weights = torch.tensor([0.8 ** i / (T * world) for i in range(args.ttt)], device=device)
    r = timed_steps(model, opt, batch, None, args, device, weights)
    return [{"mode": "dp", "world": world, "tokens_per_rank": T, **r,
             "tokens_per_s": world * T / r["s_per_step"]}]


def mode_sp(args, device) -> list[dict]:
    model, opt, cfg = build(args, device, fsdp=True)
    sp = SPGroup.create(dist.get_world_size(), device.type)
    results = []
    for T in args.lengths:
        batch, shard = shard_batch(row(T, cfg, args.conv_len or T, seed=0, hidden=False), sp, args.ttt, device)
        batch.hidden = torch.randn(batch.hidden.shape, device=device, dtype=torch.bfloat16)
        weights = torch.tensor([0.8 ** i / T for i in range(args.ttt)], device=device)
        r = timed_steps(model, opt, batch, shard, args, device, weights)
        results.append({"mode": "sp", "world": sp.size, "row_tokens": T, "tokens_per_rank": T // sp.size, **r,
                        "tokens_per_s": T / r["s_per_step"]})
        write(args, results)
        del batch, shard
    return results


def mode_sp_check(args, device) -> list[dict]:
    """One row: SP (this rank's slice) vs the whole row on this device; plain replicated model, grads summed."""
    model, _, cfg = build(args, device, fsdp=False)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model.to(dtype)
    sp = SPGroup.create(dist.get_world_size(), device.type)
    results = []
    for T in args.lengths:
        full = row(T, cfg, args.conv_len or max(2, T // 3 + 1), seed=0)
        weights = torch.tensor([0.8 ** i / T for i in range(args.ttt)], device=device)
        ref = ttt_forward(model, full.to(device), weights, args.ttt, checkpoint=True)
        ref.loss.backward()
        ref_g = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        local, shard = shard_batch(full, sp, args.ttt, device)
        out = ttt_forward(model, local, weights, args.ttt, checkpoint=True, sp=shard)
        out.loss.backward()
        loss = out.loss.detach().double()
        dist.all_reduce(loss)
        errs = []
        for p, g in zip([p for p in model.parameters() if p.requires_grad], ref_g):
            s = p.grad.float()
            dist.all_reduce(s)
            errs.append(float((s - g).norm() / g.norm().clamp(min=1e-30)))
        model.zero_grad(set_to_none=True)
        ref_loss = float(ref.loss.detach())
        rel = abs(float(loss) - ref_loss) / abs(ref_loss)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        results.append({"mode": "sp-check", "world": sp.size, "row_tokens": T, "loss_sp": float(loss),
                        "loss_1": ref_loss, "loss_rel_err": rel, "grad_rel_err_max": max(errs),
                        "ok": rel < tol and max(errs) < tol * 10})
    return results


def write(args, results: list[dict]) -> None:
    if dist.get_rank() != 0 or not args.out:
        return
    out = Path(args.out)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["dp", "sp", "sp-check"], default="dp")
    p.add_argument("--tokens", type=int, default=8192, help="dp: tokens per rank per step")
    p.add_argument("--lengths", type=int, nargs="+", default=[262144, 524288, 1048576], help="sp: row lengths")
    p.add_argument("--conv-len", type=int, default=0, help="conversation length inside a row (0 = whole row)")
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy shape (CPU smoke test)")
    p.add_argument("--no-compile", action="store_true", help="sp-check only: dp/sp compile inside parallelize")
    p.add_argument("--out", type=str, default=None, help="JSON file (rank 0)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device; use --device cpu --tiny")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if not args.no_compile:
            compile_kernels(device)  # parallelize's step 1; also for sp-check's unsharded reference model
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        results = {"dp": mode_dp, "sp": mode_sp, "sp-check": mode_sp_check}[args.mode](args, device)
        stamp = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "torchrun --nproc-per-node {} ".format(dist.get_world_size()) + " ".join(sys.argv),
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        results = [{**r, **stamp} for r in results]
        write(args, results)
        if dist.get_rank() == 0:
            for r in results:
                print(json.dumps(r), flush=True)
        if any(r.get("ok") is False for r in results):
            raise SystemExit("sp-check: sequence-parallel result differs from the single-device one")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
