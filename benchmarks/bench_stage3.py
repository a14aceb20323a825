"""One stage-3 training step of a Llama-3.1-8B-shaped EAGLE-3 draft on one GPU: s/step, tokens/s, peak memory, MFU.

    python benchmarks/bench_stage3.py --out bench_stage3.json                # full sweep, both AC modes
    python benchmarks/bench_stage3.py --sizes 8192 16384 --ac off --optimizer

Shape (ANCHORS.md): hidden 4096, 32 heads, 8 KV heads, head_dim 128, intermediate 14336, target vocab 128256,
draft vocab 32000, fc input 3 x 4096; TTT 7, batch 1 row, random data (all positions valid), bf16 params, full
causal attention, trainable lm_head, frozen embeddings. Forward + backward (+ a fused AdamW step with --optimizer).
First a correctness check of the GPU TTT attention (varlen flash + merged diagonal keys) against the naive
reference in fp32. argparse only (the GPU stack has no hydra). An OOM at one size is reported and the sweep goes on.
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stage3_train.attention import Segments, reference_ttt_attention, ttt_attention  # noqa: E402
from stage3_train.model import DraftConfig, Eagle3Draft, compile_hot_paths, num_flops_per_token  # noqa: E402
from stage3_train.ttt import PackedBatch, ttt_forward  # noqa: E402

LLAMA_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
                rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
GIB = 1024 ** 3


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul rate on random data (the MFU denominator)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def check_attention() -> dict:
    """GPU bf16 TTT attention vs the fp32 naive reference: forward and grads, packed segments, GQA, depth 3."""
    torch.manual_seed(0)
    lengths, Hq, Hkv, D, depth = [300, 77, 645], 32, 8, 128, 3
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).cuda()
    N = doc.numel()
    q = torch.randn(N, Hq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ks = [torch.randn(N, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(depth + 1)]
    vs = [torch.randn(N, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(depth + 1)]
    out = ttt_attention(q, ks, vs, Segments.from_doc_ids(doc[None]))
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, *ks, *vs], grad)
    q32, ks32, vs32 = (q.float().detach().requires_grad_(), [k.float().detach().requires_grad_() for k in ks],
                       [v.float().detach().requires_grad_() for v in vs])
    ref = reference_ttt_attention(q32, ks32, vs32, doc)
    want = torch.autograd.grad(ref, [q32, *ks32, *vs32], grad.float())
    rel = lambda a, b: float((a.detach().float() - b.detach()).norm() / b.detach().norm())  # noqa: E731
    res = {"out": rel(out, ref), **{f"grad{j}": rel(a, b) for j, (a, b) in enumerate(zip(got, want))}}
    res["ok"] = all(v < 2e-2 for v in res.values())
    return res


def random_batch(T: int, cfg: DraftConfig) -> PackedBatch:
    dev = "cuda"
    return PackedBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (1, T), device=dev),
        hidden=torch.randn(1, T, cfg.num_aux_layers * cfg.target_hidden_size, device=dev, dtype=torch.bfloat16),
        target_ids=torch.randint(0, cfg.draft_vocab_size, (1, T), device=dev),  # identity vocab: all labels valid
        loss_mask=torch.ones(1, T, dtype=torch.bool, device=dev),
        position_ids=torch.arange(T, device=dev)[None],
        doc_ids=torch.zeros(1, T, dtype=torch.long, device=dev))


def bench_one(model, opt, cfg, T: int, ttt: int, ac: bool, iters: int, warmup: int) -> dict:
    batch = random_batch(T, cfg)
    weights = torch.tensor([0.8 ** i / T for i in range(ttt)], device="cuda")

    def step():
        out = ttt_forward(model, batch, weights, ttt, checkpoint=ac)
        out.loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
        return out

    for _ in range(warmup):
        out = step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    loss = float(out.loss)
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"non-finite loss {loss} at T={T}")
    s = sorted(times)[len(times) // 2]
    return {"tokens": T, "ac": ac, "s_per_step": s, "tokens_per_s": T / s,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB, "loss": loss,
            "acc0": float(out.correct[0]) / max(1, int(out.valid[0]))}


def profile_step(model, cfg, T: int, ttt: int, ac_off: bool, out: str | None) -> None:
    """Top CUDA kernels of one step (after a warm-up step), printed and saved beside --out."""
    from torch.profiler import ProfilerActivity, profile

    bench_one(model, None, cfg, T, ttt, not ac_off, iters=1, warmup=1)
    batch = random_batch(T, cfg)
    weights = torch.tensor([0.8 ** i / T for i in range(ttt)], device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ttt_forward(model, batch, weights, ttt, checkpoint=not ac_off).loss.backward()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    print(table, flush=True)
    if out:
        Path(out).with_suffix(".profile.txt").write_text(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+",
                   default=[2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144])
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--ac", choices=["on", "off", "both"], default="both",
                   help="activation checkpointing per TTT step; 'both' runs off up to --max-off-tokens")
    p.add_argument("--max-off-tokens", type=int, default=16384)
    p.add_argument("--optimizer", action="store_true", help="also time a fused AdamW step")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=str, default=None, help="JSON file for all numbers")
    p.add_argument("--no-compile", action="store_true", help="keep the elementwise kernels eager")
    p.add_argument("--profile", type=int, default=8192, help="profile one step at this size (0 = off)")
    p.add_argument("--time-budget", type=float, default=480.0, help="stop starting new sizes after this many s")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_stage3 needs a CUDA GPU")
    t_start = time.time()
    props = torch.cuda.get_device_properties(0)
    report: dict = {"device": props.name, "torch": torch.__version__, "args": vars(args)}
    if not args.no_compile:
        compile_hot_paths()
    report["attention_check"] = check_attention()
    print("attention check (rel. error vs fp32 reference):", json.dumps(report["attention_check"]), flush=True)
    report["matmul_tflops"] = peak = matmul_tflops()
    print(f"measured bf16 matmul: {peak:.0f} TFLOP/s", flush=True)

    cfg = DraftConfig.from_target_config(LLAMA_8B, draft_vocab_size=32000)
    with torch.device("cuda"):
        model = Eagle3Draft(cfg).to(dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    report["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True) if args.optimizer else None
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.ac]
    if args.profile:
        profile_step(model, cfg, args.profile, args.ttt, args.ac != "on", args.out)
    rows = []
    for ac in modes:
        for T in args.sizes:
            if not ac and args.ac == "both" and T > args.max_off_tokens:
                continue
            if time.time() - t_start > args.time_budget:
                rows.append({"tokens": T, "ac": ac, "skipped": "time budget"})
                continue
            iters, warmup = (args.iters, args.warmup) if T <= 32768 else (1, 1)
            try:
                row = bench_one(model, opt, cfg, T, args.ttt, ac, iters, warmup)
                row["mfu"] = num_flops_per_token(cfg, args.ttt, T) * row["tokens_per_s"] / (peak * 1e12)
            except torch.OutOfMemoryError:
                row = {"tokens": T, "ac": ac, "oom": True}
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({**report, "rows": rows}, indent=1))
    report["rows"] = rows
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{props.name}, TTT {args.ttt}, optimizer step: {args.optimizer}, matmul {peak:.0f} TFLOP/s")
    print("| tokens | AC | s/step | tokens/s | peak GiB | MFU |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "s_per_step" in r:
            print(f"| {r['tokens']:,} | {'on' if r['ac'] else 'off'} | {r['s_per_step']:.3f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {r['mfu']:.2f} |")
        else:
            print(f"| {r['tokens']:,} | {'on' if r['ac'] else 'off'} | {r.get('skipped', 'out of memory')} | | | |")


if __name__ == "__main__":
    main()
