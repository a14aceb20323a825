"""Stage-2 capture throughput on a random-weight gpt-oss-20b-shaped MoE target (GPU; ``--tiny`` runs on CPU).

    python benchmarks/bench_stage2_moe.py --out results/stage2_moe_h200.json            # H200: 2K/8K/32K/64K
    python benchmarks/bench_stage2_moe.py --experts grouped_mm eager --lengths 2048 8192 ...
    python benchmarks/bench_stage2_moe.py --tiny --out /tmp/moe.json                   # CPU smoke test

The target: transformers' ``GptOssConfig`` with gpt-oss-20b's shape (24 layers, hidden 2880, 64 query / 8 kv heads
of 64, 32 experts top-4 of width 2880, vocab 201,088, sliding window 128 on every other layer, attention sinks,
YaRN rope), random bf16 weights built on the meta device and materialised on the GPU (~42 GB).

Per conversation length (one conversation per row, ``--tokens`` tokens per pass in all):

* ``stage2``: stage 2's real path, ``HiddenCapture`` (packed attention with sliding windows + sinks, hooks on the aux
  layers, chunked lm_head argmax) + ``HostStaging`` + ``AsyncShardWriter`` through ``capture_shard``: shard writes
  (Arrow, sha256, fsync) included, clock stopped when the last shard is renamed; ``stage2 fwd-only``: the same
  without writes.
* ``hf``: HF's plain ``model(input_ids, output_hidden_states=True)`` on the same shape (its own attention,
  ``--hf-attn``, default eager: gpt-oss has no sdpa path in HF and eager materialises [64, T, T] scores, so it is
  expected to run out of memory at long T; full [T, V] logits). Out-of-memory is recorded, not fatal.
* Each with every ``--experts`` implementation: transformers' ``experts_implementation`` switch
  (``model.set_experts_implementation(...)``, or ``from_pretrained(..., experts_implementation="grouped_mm")``):
  ``eager`` is HF's per-expert Python loop (one GEMM pair per hit expert, host syncs on ``nonzero``),
  ``grouped_mm`` one ``torch.nn.functional.grouped_mm`` over all experts (Hopper / SM80+ kernels; the default when
  it can dispatch), ``batched_mm`` a batched GEMM over gathered expert weights.

Reported: tokens/s, peak ``torch.cuda.max_memory_allocated``, and MFU counted on ACTIVE parameters against a bf16
matmul measured on the same GPU: FLOPs/token = 2 * (attention + router + norms + top_k/num_experts of the expert
weights + lm_head) + attention scores 2 * 2 * keys * Hq * D per layer (keys = T/2 causal on full layers,
min(W, T) on window layers). Imports stage2_hidden without Hydra: runs on the bare GPU image.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402

from bench_stage2 import make_rows, materialise_random, matmul_tflops, timed_pass  # noqa: E402
from common.target import default_aux_layer_ids  # noqa: E402
from stage2_hidden.capture import PACKED_ATTN, HiddenCapture  # noqa: E402

GPT_OSS_20B = dict(hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                   num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                   vocab_size=201088, sliding_window=128, max_position_embeddings=131072,
                   layer_types=["sliding_attention", "full_attention"] * 12,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                    "original_max_position_embeddings": 4096})
TINY = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_local_experts=8, num_experts_per_tok=2, vocab_size=1000, sliding_window=16,
            max_position_embeddings=4096, layer_types=["sliding_attention", "full_attention"] * 4)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    """Random-weight gpt-oss on the meta device, materialised in place (no fp32 copy)."""
    cfg = GptOssConfig(**shape, tie_word_embeddings=False, attn_implementation="eager")
    return materialise_random(GptOssForCausalLM, cfg, device, dtype), cfg


def active_params(model, cfg) -> int:
    """Parameters one token runs through: all but the embedding, experts counted top_k / num_experts."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        frac = cfg.num_experts_per_tok / cfg.num_local_experts if ".experts." in name else 1.0
        total += p.numel() * frac
    return int(total)


def flops_per_token(model, cfg, seq_len: int) -> float:
    attn = 0.0
    for kind in cfg.layer_types:
        keys = min(cfg.sliding_window, seq_len) if kind == "sliding_attention" else seq_len / 2
        attn += 2 * 2 * keys * cfg.num_attention_heads * cfg.head_dim
    return 2 * active_params(model, cfg) + attn


def hf_forward(model, rows, attn: str) -> float:
    """Seconds of HF's plain forward with output_hidden_states=True over ``rows`` (one conversation each)."""
    model.set_attn_implementation(attn)
    try:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for r in rows:
                ids = torch.from_numpy(r.input_ids).to(model.device, torch.long)[None]
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
                del out
        sync()
        return time.perf_counter() - t
    finally:
        model.set_attn_implementation(PACKED_ATTN)


def profile_forward(cap, row, top: int = 25) -> str:
    """One conversation's capture forward under torch.profiler: the kernels by device time (a table)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with profile(activities=activities) as prof, torch.inference_mode():
        cap.forward([torch.from_numpy(row.input_ids)])
        sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)
    print(f"profile, one conversation of {len(row.input_ids)} tokens:\n{table}", flush=True)
    return table


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results file (a folder gets stage2_moe.json)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    ap.add_argument("--tokens", type=int, default=131072, help="tokens per timed pass (>= one conversation)")
    ap.add_argument("--experts", nargs="+", default=["grouped_mm", "eager"],
                    help="transformers experts_implementation values to time (eager = HF's per-expert loop)")
    ap.add_argument("--hf-attn", default="eager", help="attention of the HF baseline ('' to skip the baseline)")
    ap.add_argument("--hf-max-length", type=int, default=65536, help="skip the HF baseline above this length")
    ap.add_argument("--writer-threads", type=int, default=2)
    ap.add_argument("--rows-per-shard", type=int, default=4)
    ap.add_argument("--tmp", default=None, help="folder for the shard writes (local NVMe)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config on CPU (smoke test)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one conversation's forward per length (kernel table printed, saved beside --out)")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = TINY if args.tiny else GPT_OSS_20B
    if args.tiny:
        args.lengths = [n for n in args.lengths if n <= 512] or [128, 512]
        args.tokens = min(args.tokens, 1024)
    model, cfg = build_model(shape, device, dtype)
    layer_ids = default_aux_layer_ids(cfg.num_hidden_layers)
    cap = HiddenCapture(model, layer_ids, lm_head_chunk=8192)
    width = len(layer_ids) * cfg.hidden_size
    peak = matmul_tflops(device) if device == "cuda" else None
    tmp = args.tmp or tempfile.gettempdir()
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "shape": {k: v for k, v in shape.items() if k != "layer_types"}, "layer_ids": layer_ids,
            "active_params": active_params(model, cfg),
            "total_params": sum(p.numel() for p in model.parameters()), "matmul_tflops": peak}
    print(json.dumps(meta), flush=True)
    results = []
    profiles: dict[str, str] = {}

    def record(impl, experts, length, n, secs, extra=None):
        tokens = n * length
        tps = tokens / secs
        row = {"impl": impl, "experts": experts, "length": length, "conversations": n, "tokens": tokens,
               "seconds": secs, "tokens_per_s": tps, "peak_gib": peak_gib(),
               "mfu_active": tps * flops_per_token(model, cfg, length) / (peak * 1e12) if peak else None,
               **(extra or {})}
        results.append(row)
        print(json.dumps(row), flush=True)

    for experts in args.experts:
        try:
            model.set_experts_implementation(experts)
        except (ValueError, ImportError) as e:
            results.append({"experts": experts, "error": f"{type(e).__name__}: {e}"[:300]})
            print(json.dumps(results[-1]), flush=True)
            continue
        for length in args.lengths:
            n = max(1, args.tokens // length)
            rows = make_rows(n, length, cfg.vocab_size, seed=length)
            warm = make_rows(1, min(length, 2048), cfg.vocab_size, seed=1)
            try:
                timed_pass(cap, warm, length, 1, width, layer_ids, 1, tmp)   # warm-up (kernels, allocator)
                if args.profile:
                    profiles[f"{experts}-{length}"] = profile_forward(cap, rows[0])
                reset_peak()
                secs, _ = timed_pass(cap, rows, length, args.rows_per_shard, width, layer_ids, 0, tmp)
                record("stage2 fwd-only", experts, length, n, secs)
                reset_peak()
                secs, nbytes = timed_pass(cap, rows, length, args.rows_per_shard, width, layer_ids,
                                          args.writer_threads, tmp)
                record("stage2", experts, length, n, secs, {"bytes_per_token": nbytes / (n * length),
                                                            "expected_bytes_per_token": width * 2 + 9})
            except torch.OutOfMemoryError as e:
                results.append({"impl": "stage2", "experts": experts, "length": length, "error": f"OOM: {e}"[:200]})
                print(json.dumps(results[-1]), flush=True)
            if args.hf_attn and length <= args.hf_max_length:
                try:
                    reset_peak()
                    secs = hf_forward(model, rows, args.hf_attn)
                    record(f"hf output_hidden_states ({args.hf_attn})", experts, length, n, secs)
                except torch.OutOfMemoryError as e:
                    results.append({"impl": f"hf output_hidden_states ({args.hf_attn})", "experts": experts,
                                    "length": length, "error": f"OOM: {e}"[:200]})
                    print(json.dumps(results[-1]), flush=True)
            reset_peak()

    out = Path(args.out)
    if out.is_dir() or not out.suffix:
        out.mkdir(parents=True, exist_ok=True)
        out = out / "stage2_moe.json"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    for key, table in profiles.items():
        (out.parent / f"profile-{key}.txt").write_text(table)
    print("\n| impl | experts | tokens/conv | tokens/s | peak GiB | MFU (active) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r.get('impl', '')} | {r['experts']} | {r.get('length', '')} | {r['error'][:50]} | | |")
        else:
            pk = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else ""
            mfu = f"{r['mfu_active']:.1%}" if r["mfu_active"] is not None else ""
            print(f"| {r['impl']} | {r['experts']} | {r['length']:,} | {r['tokens_per_s']:,.0f} | {pk} | {mfu} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
