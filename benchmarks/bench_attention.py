"""A kernel trial for stage 3's causal attention block on CUDA: the product's FlashAttention-2 varlen path vs cuDNN.

    python benchmarks/bench_attention.py --out results/attn                       # both shapes, 8K and 32K
    python benchmarks/bench_attention.py --shape llama --lengths 8192 --segments 1 8 --out results/attn

`flash`: what the trainer calls (`stage3_train.attention.flash_block_forward` / `flash_block_backward`); `cudnn`:
the candidate, cuDNN's fused attention over the same ragged segments (`aten._cudnn_attention_forward/_backward` with
cu_seqlens, native GQA), called here only: it is not a product option (H200, torch 2.11 + cuDNN 9.19, 2026-12-02:
forward right but ~30x slower, backward non-finite; benchmarks/RESULTS.md). Forward and backward of one causal
block over T packed tokens split into S conversations
(equal lengths, cu_seqlens), bf16, the draft's head layout: llama = Llama-3.1-8B draft (32 q / 8 kv heads x 128),
gpt-oss = gpt-oss-120b draft (64 / 8 x 64). Each kernel is checked against the other before it is timed: out,
lse, dq, dk, dv (max abs difference over max abs value of the FlashAttention-2 result). Median of --iters after
--warmup; FLOPs counted as causal (half of 4 T^2 Hq D per segment forward, 2.5x that backward).
Writes --out/bench_attention.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stage3_train.attention import FlashBlock, flash_block_backward, flash_block_forward  # noqa: E402

SHAPES = {"llama": (32, 8, 128), "gpt-oss": (64, 8, 64)}  # (q heads, kv heads, head dim) of the draft


def lse_heads_first(lse: torch.Tensor, n: int, h: int) -> torch.Tensor:
    """A kernel's log-sum-exp ([n, h, 1], [n, h] or [h, n]) as [h, n] fp32 (the product's layout)."""
    if lse.dim() == 2 and lse.shape == (h, n):
        return lse.float().contiguous()
    if lse.shape[0] == n and lse.numel() == h * n:
        return lse.reshape(n, h).t().float().contiguous()
    raise RuntimeError(f"unexpected cuDNN lse layout {tuple(lse.shape)} for {n} queries x {h} heads")


def cudnn_forward(q, k, v, blk: FlashBlock, scale: float):
    out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, blk.cu_q, blk.cu_k, blk.max_q, blk.max_k, True, 0.0, blk.causal, False, scale=scale)
    return out, lse_heads_first(lse, q.shape[0], q.shape[1]), (seed, offset, tuple(lse.shape))


def cudnn_backward(dout, q, k, v, out, lse_hn, blk: FlashBlock, scale: float, aux):
    seed, offset, lse_shape = aux
    lse = lse_hn if tuple(lse_hn.shape) == lse_shape else lse_hn.t().reshape(lse_shape).contiguous()
    return torch.ops.aten._cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, blk.cu_q, blk.cu_k, blk.max_q, blk.max_k, 0.0, blk.causal,
        scale=scale)[:3]


KERNELS = {"flash": (flash_block_forward, flash_block_backward), "cudnn": (cudnn_forward, cudnn_backward)}


def causal_block(T: int, segments: int, device) -> FlashBlock:
    bounds = tuple(round(i * T / segments) for i in range(segments + 1))
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    span = max(b - a for a, b in zip(bounds, bounds[1:]))
    return FlashBlock(cu, cu, span, span, bounds, bounds, causal=True)


def run_kernel(kernel: str, q, k, v, dout, blk: FlashBlock, scale: float):
    forward, backward = KERNELS[kernel]
    out, lse, aux = forward(q, k, v, blk, scale)
    dq, dk, dv = backward(dout, q, k, v, out, lse, blk, scale, aux)
    return out, lse, dq, dk, dv


def time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def bench_case(shape: str, T: int, segments: int, args) -> dict:
    Hq, Hkv, D = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(T, Hkv, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    blk, scale = causal_block(T, segments, "cuda"), D ** -0.5
    row: dict = {"shape": shape, "tokens": T, "segments": segments}
    results = {}
    for kernel in KERNELS:
        try:
            results[kernel] = run_kernel(kernel, q, k, v, dout, blk, scale)
        except RuntimeError as err:  # a kernel this build or GPU does not have: recorded, the sweep goes on
            row[kernel] = {"error": str(err).splitlines()[0][:300]}
    ref = results.get("flash")
    seg_flops = sum((b - a) ** 2 for a, b in zip(blk.bounds_q, blk.bounds_q[1:])) * 2 * Hq * D  # causal fwd
    for kernel, res in results.items():
        if ref is not None and kernel != "flash":
            row[kernel] = {"max_rel_err": {name: float((x.float() - r.float()).abs().max() / r.float().abs().max())
                                           for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), res, ref)}}
        row.setdefault(kernel, {})
        fwd = time_ms(lambda: KERNELS[kernel][0](q, k, v, blk, scale), args.warmup, args.iters)
        row[kernel] |= {"fwd_ms": fwd, "fwd_tflops": seg_flops / fwd / 1e9}
        errors = row[kernel].get("max_rel_err", {})
        if not all(e < 0.05 for e in errors.values()):  # NaN too: a wrong backward is not timed (it may fault)
            row[kernel]["backward"] = "wrong: not timed"
            continue
        both = time_ms(lambda: run_kernel(kernel, q, k, v, dout, blk, scale), args.warmup, args.iters)
        row[kernel] |= {"fwd_bwd_ms": both, "bwd_ms": both - fwd, "fwd_bwd_tflops": 3.5 * seg_flops / both / 1e9}
    if "fwd_bwd_ms" in row.get("cudnn", {}) and "fwd_bwd_ms" in row.get("flash", {}):
        row["cudnn_speedup"] = row["flash"]["fwd_bwd_ms"] / row["cudnn"]["fwd_bwd_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--segments", type=int, nargs="+", default=[1, 8], help="conversations packed in the row")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py compares CUDA kernels: no CUDA device here")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(sys.argv), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "rows": []}
    print("| shape | tokens | segments | flash fwd+bwd ms | cudnn fwd+bwd ms | cudnn speed-up | cudnn max rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shape:
        for T in args.lengths:
            for segments in args.segments:
                row = bench_case(shape, T, segments, args)
                report["rows"].append(row)
                (args.out / "bench_attention.json").write_text(json.dumps(report, indent=1))
                f, c = row.get("flash", {}), row.get("cudnn", {})
                err = max(c["max_rel_err"].values()) if "max_rel_err" in c else c.get("error", "")
                print(f"| {shape} | {T:,} | {segments} | {f.get('fwd_bwd_ms', f.get('error', ''))} | "
                      f"{c.get('fwd_bwd_ms', c.get('error', ''))} | {row.get('cudnn_speedup', '')} | {err} |",
                      flush=True)


if __name__ == "__main__":
    main()
