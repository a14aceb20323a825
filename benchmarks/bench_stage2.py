"""Stage-2 capture throughput on a random-weight Llama-3.1-8B-shaped target (GPU; ``--tiny`` runs on CPU).

    python benchmarks/bench_stage2.py --out results.json          # H100: 2K/8K/32K/128K conversations
    python benchmarks/bench_stage2.py --baseline DIR:PKG ...       # A/B against an older copy of the package

Per conversation length: tokens/s of the whole stage-2 hot path (packed forward with hooks on the 3 aux
layers, chunked lm_head argmax, device->host copy into a pinned ring on a side stream, Arrow shard writes
with sha256 and fsync on writer + helper threads) measured from the first forward until the last shard is
renamed; the same without the shard writes (``fwd tok/s``); peak ``torch.cuda.max_memory_allocated``; and MFU against a
bf16 matmul measured on the same GPU. FLOPs per token = 2 * (non-embedding params + lm_head) plus causal
attention 2 * T * H * L (QK^T and PV over T/2 keys on average, 2 FLOPs per multiply-add).
Imports only stage2_hidden modules without Hydra, so it runs on the bare GPU image (no pip installs).
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from common.target import default_aux_layer_ids as default_layer_ids  # noqa: E402
from stage2_hidden.capture import HiddenCapture, pack_groups, prepare_model  # noqa: E402
from stage2_hidden.pipeline import AsyncShardWriter, capture_shard  # noqa: E402
from stage2_hidden.staging import HostStaging  # noqa: E402
from stage2_hidden.render import Rendered  # noqa: E402
from stage2_hidden.format import make_schema  # noqa: E402

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def build_model(shape: dict, device: str, dtype: torch.dtype):
    """Random-weight Llama built on the meta device and materialised in place (no fp32 copy, seconds)."""
    cfg = LlamaConfig(**shape, tie_word_embeddings=False)
    return materialise_random(LlamaForCausalLM, cfg, device, dtype), cfg


def materialise_random(model_cls, cfg, device: str, dtype: torch.dtype):
    """`model_cls(cfg)` on the meta device, materialised on `device` with N(0, 0.02) weights, unit norms, zero
    biases, and stage 2's packed attention (`prepare_model`)."""
    with torch.device("meta"):
        model = model_cls(cfg).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        with torch.device(device):  # recompute inv_freq (to_empty left the buffers uninitialised)
            model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    return prepare_model(model)


def matmul_tflops(device: str, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def flops_per_token(cfg: LlamaConfig, model, seq_len: int) -> float:
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return 2 * params + 2 * seq_len * cfg.hidden_size * cfg.num_hidden_layers


def make_rows(n: int, length: int, vocab: int, seed: int) -> list[Rendered]:
    rng = np.random.default_rng(seed)
    return [Rendered(f"bench-{length}-{i}", rng.integers(0, vocab, length, dtype=np.int32),
                     (rng.random(length) < 0.6).astype(np.uint8), "template") for i in range(n)]


def prewarm_pinned(nbytes: int, count: int) -> None:
    """Allocate and free ``count`` pinned blocks of ``nbytes``: torch's host caching allocator keeps them,
    so code that allocates pinned buffers per forward (the baseline) pays no cudaHostAlloc while timed."""
    if torch.cuda.is_available() and count > 0:
        blocks = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        del blocks


def timed_pass(cap, rows, batch_tokens, rows_per_shard, width, layer_ids, threads: int, tmp_root: str,
               baseline=None, slots: int = 3):
    """Seconds for all rows: forwards + shard writes (``threads`` writers; 0 = no writes), all on disk.

    ``baseline``: another copy of the package (its ``pipeline`` module, old API without HostStaging),
    timed the same way for an A/B comparison in one process. Writers and pinned buffers are set up
    before the clock starts; the clock stops when the last shard is renamed."""
    write = threads > 0
    out_dir = Path(tempfile.mkdtemp(dir=tmp_root))
    try:
        schema = make_schema(width, layer_ids)
        staging = None if baseline else HostStaging(slots, batch_tokens, width, cap.device)
        if baseline:
            writer = baseline.AsyncShardWriter(out_dir, schema, 2, threads) if write else None
        else:
            writer = AsyncShardWriter(out_dir, schema, 2, threads) if write else None
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t = time.perf_counter()
        for start in range(0, len(rows), rows_per_shard):
            shard, index = rows[start:start + rows_per_shard], start // rows_per_shard
            if write and baseline:
                baseline.capture_shard(cap, writer, index, shard, batch_tokens)
            elif write:
                capture_shard(cap, writer, staging, index, shard, batch_tokens)
            elif baseline:
                _forward_only_baseline(cap, shard, batch_tokens)
            else:
                _forward_only(cap, staging, shard, batch_tokens)
        if write:
            writer.finish()
        sync()
        return time.perf_counter() - t, sum(f.stat().st_size for f in out_dir.glob("*.arrow"))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _forward_only(cap, staging, rows, batch_tokens):
    """Forwards and device->host staging as in ``capture_shard``, no writes (buffers recycled at once)."""
    pending = collections.deque()
    for group in pack_groups([len(r.input_ids) for r in rows], batch_tokens):
        out = cap.forward([torch.from_numpy(rows[i].input_ids) for i in group])
        if staging.free.empty() and pending:  # the oldest copy finished a forward ago: no wait in practice
            oldest = pending.popleft()
            oldest.wait()
            oldest.release()
        pending.append(staging.stage(out.hidden_TW, out.target_T))
    for st in pending:
        st.wait()
        st.release()


def _forward_only_baseline(cap, rows, batch_tokens):
    """The first version's staging: a fresh pinned buffer per forward, copied on the compute stream."""
    for group in pack_groups([len(r.input_ids) for r in rows], batch_tokens):
        out = cap.forward([torch.from_numpy(rows[i].input_ids) for i in group])
        if out.hidden_TW.is_cuda:
            host = torch.empty(out.hidden_TW.shape, dtype=torch.bfloat16, pin_memory=True)
            host.copy_(out.hidden_TW, non_blocking=True)


def sha256_gbps(nbytes: int = 1 << 30) -> float:
    """Single-thread sha256 rate of this host (the hasher thread's ceiling)."""
    import hashlib

    buf = np.random.default_rng(1).integers(0, 255, 64 << 20, dtype=np.uint8)
    h, t = hashlib.sha256(), time.perf_counter()
    for _ in range(max(1, nbytes // buf.nbytes)):
        h.update(buf)
    return max(1, nbytes // buf.nbytes) * buf.nbytes / (time.perf_counter() - t) / 1e9


def disk_gbps(tmp_root: str, threads: int, gib_per_thread: float = 1.0) -> float:
    """GB/s of ``threads`` parallel sequential writes + fsync (the ceiling for shard writes)."""
    import threading

    buf = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    out_dir = Path(tempfile.mkdtemp(dir=tmp_root))
    n = int(gib_per_thread * 16)

    def one(i):
        with open(out_dir / f"f{i}", "wb") as f:
            for _ in range(n):
                f.write(buf)
            f.flush()
            import os
            os.fsync(f.fileno())
    t = time.perf_counter()
    ths = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    secs = time.perf_counter() - t
    shutil.rmtree(out_dir, ignore_errors=True)
    return threads * n * len(buf) / secs / 1e9


def packed_check(cap, vocab: int) -> float:
    """max |packed - alone| / max |alone| of the hidden rows of a conversation packed after another."""
    a, b = torch.randint(0, vocab, (300,)), torch.randint(0, vocab, (500,))
    packed = cap.forward([a, b])
    alone = cap.forward([b])
    diff = (packed.hidden_TW[300:].float() - alone.hidden_TW.float()).abs().max()
    same = (packed.target_T[300:] == alone.target_T).float().mean().item()
    return float(diff / alone.hidden_TW.float().abs().max()), same


def count_syncs(cap, vocab: int, width: int, tokens: int = 16384, seg: int = 2048):
    """Host-device synchronisations in one packed forward + staging (torch's sync debug mode), with where."""
    import warnings

    if not torch.cuda.is_available():
        return None
    seqs = [torch.randint(0, vocab, (seg,)) for _ in range(tokens // seg)]
    staging = HostStaging(1, tokens, width, cap.device)
    cap.forward(seqs)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = cap.forward(seqs)
            staged = staging.stage(out.hidden_TW, out.target_T)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    staged.wait()
    staged.release()
    return {"count": len(caught), "where": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught})}


def _row(cfg, model, peak, device, impl, length, bt, threads, n, secs, fwd_secs, nbytes, width) -> dict:
    tokens = n * length
    tps = tokens / secs
    return {"impl": impl, "length": length, "batch_tokens": bt, "writer_threads": threads, "conversations": n,
            "tokens": tokens, "seconds": secs, "tokens_per_s": tps,
            "fwd_tokens_per_s": tokens / fwd_secs if fwd_secs else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None,
            "bytes_per_token": nbytes / tokens if nbytes else None, "expected_bytes_per_token": width * 2 + 9,
            "mfu": tps * flops_per_token(cfg, model, length) / (peak * 1e12) if peak else None}


def _load_baseline(spec: str | None):
    """``DIR:PACKAGE`` -> that package's pipeline module (an older copy of stage2_hidden), or None."""
    if not spec:
        return None
    folder, name = spec.rsplit(":", 1)
    sys.path.insert(0, str(Path(folder).resolve()))
    return importlib.import_module(f"{name}.pipeline")


def bench_length(args, ctx, length: int, baseline) -> list[dict]:
    """All passes for one conversation length: warm-up, fwd-only, baseline (if any), this version."""
    cap, cfg, model, peak, device, width, layer_ids = ctx
    n = max(1, args.tokens // length)
    rows = make_rows(n, length, cfg.vocab_size, seed=length)
    rps = max(1, args.shard_tokens // length)
    out = []
    for bt in sorted({max(bt, length) for bt in args.batch_tokens}):
        common = (cap, rows, bt, rps, width, layer_ids)
        forwards = len(pack_groups([length] * n, bt))
        detail = length <= args.detail_max_length
        row = lambda impl, threads, secs, fwd, nbytes: _row(cfg, model, peak, device, impl, length, bt, threads,
                                                            n, secs, fwd, nbytes, width)
        try:
            warm = [Rendered(r.id, r.input_ids[:2048], r.loss_mask[:2048], r.source) for r in rows[:1]]
            timed_pass(cap, warm, bt, 1, width, layer_ids, 1, args.tmp, slots=args.slots)
            fwd_secs = None
            if length <= args.fwd_max_length:
                fwd_secs, _ = timed_pass(*common, 0, args.tmp, slots=args.slots)
                out.append(row("fwd-only", 0, fwd_secs, fwd_secs, 0))
                print(json.dumps(out[-1]), flush=True)
            if baseline is not None:
                prewarm_pinned(bt * width * 2, min(8, forwards + 1))
                if detail:
                    secs, _ = timed_pass(*common, 0, args.tmp, baseline=baseline)
                    out.append(row("fwd-only baseline", 0, secs, secs, 0))
                    print(json.dumps(out[-1]), flush=True)
                for threads in args.writer_threads:
                    secs, nbytes = timed_pass(*common, threads, args.tmp, baseline=baseline)
                    out.append(row("baseline", threads, secs, fwd_secs, nbytes))
                    print(json.dumps(out[-1]), flush=True)
            for threads in args.writer_threads:
                for rep in range(args.repeat if detail else 1):
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    secs, nbytes = timed_pass(*common, threads, args.tmp, slots=args.slots)
                    out.append(row("this", threads, secs, fwd_secs, nbytes))
                    print(json.dumps(out[-1]), flush=True)
        except torch.OutOfMemoryError as e:
            out.append({"impl": "this", "length": length, "batch_tokens": bt, "error": f"OOM: {e}"[:200]})
            print(f"{length:>7} {bt:>7}  out of memory", flush=True)
            torch.cuda.empty_cache()
    return out


def print_table(rows: list[dict]) -> None:
    print("\n| impl | tokens/conv | packed row | writer threads | tokens/s | fwd-only tokens/s | peak GiB | MFU | bytes/token |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['length']:,} | {r['batch_tokens']:,} | | {r['error'][:40]} | | | | |")
            continue
        bpt = f"{r['bytes_per_token']:,.0f}" if r["bytes_per_token"] else ""
        fwd = f"{r['fwd_tokens_per_s']:,.0f}" if r["fwd_tokens_per_s"] else ""
        print(f"| {r['impl']} | {r['length']:,} | {r['batch_tokens']:,} | {r['writer_threads']} | {r['tokens_per_s']:,.0f} | "
              f"{fwd} | {r['peak_gib'] or 0:.1f} | {r['mfu'] or 0:.2f} | {bpt} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--tokens", type=int, default=131072, help="tokens per length (at least one conversation)")
    ap.add_argument("--batch-tokens", type=int, nargs="+", default=[8192],
                    help="packed row sizes to try (default: the pipeline's hidden.batch_tokens)")
    ap.add_argument("--shard-tokens", type=int, default=32768,
                    help="tokens per shard (rows_per_shard = max(1, shard_tokens // length))")
    ap.add_argument("--writer-threads", type=int, nargs="+", default=[2], help="writer thread counts to try")
    ap.add_argument("--slots", type=int, default=3, help="pinned staging buffers (forwards in flight to disk)")
    ap.add_argument("--repeat", type=int, default=1, help="timed passes of this version (lengths <= detail)")
    ap.add_argument("--detail-max-length", type=int, default=8192,
                    help="repeats and the baseline's fwd-only pass only up to this length")
    ap.add_argument("--fwd-max-length", type=int, default=1 << 62,
                    help="fwd-only passes only up to this length (to save device time)")
    ap.add_argument("--baseline", default=None, metavar="DIR:PACKAGE",
                    help="also time an older copy of stage2_hidden (e.g. old-checkout:stage2_hidden_old)")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="local-disk folder for the shards")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    baseline = _load_baseline(args.baseline)
    device = "cpu" if args.tiny else "cuda"
    model, cfg = build_model(TINY if args.tiny else LLAMA_8B, device, torch.float32 if args.tiny else torch.bfloat16)
    layer_ids = default_layer_ids(cfg.num_hidden_layers)
    cap = HiddenCapture(model, layer_ids, lm_head_chunk=4096)
    width = len(layer_ids) * cfg.hidden_size
    peak = None if args.tiny else matmul_tflops(device)
    err, same = packed_check(cap, cfg.vocab_size)
    results = {"device": torch.cuda.get_device_name() if not args.tiny else "cpu", "torch": torch.__version__,
               "matmul_tflops": peak, "packed_vs_alone_rel_err": err, "packed_vs_alone_argmax_agree": same,
               "layer_ids": layer_ids, "rows": [], "sha256_gbps": sha256_gbps(1 << 28 if args.tiny else 1 << 30)}
    results["syncs_per_forward"] = count_syncs(cap, cfg.vocab_size, width)
    print(f"host syncs in one packed forward + staging: {results['syncs_per_forward']}", flush=True)
    results["disk_gbps"] = {t: disk_gbps(args.tmp, t, 0.25 if args.tiny else 1.0) for t in (1, 2, 4)}
    print(f"disk write+fsync GB/s by threads: {results['disk_gbps']}  sha256 GB/s: {results['sha256_gbps']:.2f}",
          flush=True)
    print(f"device {results['device']}  bf16 matmul {peak or 0:.0f} TFLOP/s  packed-vs-alone rel err {err:.2e} "
          f"argmax agree {same:.4f}", flush=True)
    ctx = (cap, cfg, model, peak, device, width, layer_ids)
    for length in args.lengths:
        results["rows"] += bench_length(args, ctx, length, baseline)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results["rows"])

if __name__ == "__main__":
    main()
