"""Stage-3 training throughput through the trainer's OWN step (`Trainer.train_step`), beside SpecForge's step.

    python benchmarks/bench_stage3.py --out results/bench3 --specforge /path/to/SpecForge      # one GPU, both shapes
    python benchmarks/bench_stage3.py --shape llama-3.1-8b --lengths 8192 32768 --out results/bench3
    python benchmarks/bench_stage3.py --shape tiny --device cpu --lengths 64 --out /tmp/b3    # CPU smoke (tests)
    python benchmarks/bench_stage3.py --shape llama-3.1-8b --lengths 8192 --profile --set activation_checkpointing=true \
        --out results/b3-ac                      # a TrainConfig variant, and the kernel table of one step

Per shape and row length T this writes a complete stage-2 shard set with stage 2's real writer (ShardWriter,
write_manifest, stage2_hidden.vocab: random bf16 hidden states [T, 3 H_t], random tokens, every position an assistant
token, labels inside the draft vocabulary) and a fake target folder (config.json + a random embed_tokens
safetensors), builds the real `stage3_train.train.Trainer` from a `TrainConfig` (FSDP2 and kernels via
`parallelize`, AdamW, clipping, LR schedule, PackedLoader, Prefetcher; `train.activation_checkpointing=auto` unless
--ac says otherwise) and times --warmup then --iters calls of `trainer.train_step()`. One row of T tokens per step.
Reported per T: tokens/s (median step), peak GiB, MFU (stage3_train.model.num_flops_per_token over the device
peak of stage3_train.metrics), the recompute decision, and the step losses.

--specforge DIR (a sgl-project/SpecForge checkout, imported from DIR, not copied): the same shapes and T through
SpecForge's `OnlineEagle3Model` + `LlamaForCausalLMEagle3` with flex attention (its configs/llama3-8B-eagle3.json
and configs/gpt-oss-120B-eagle3.json), random data, forward + backward (loss sum_i 0.8^i ploss_i, SpecForge's
default) + clipping + AdamW step, bf16 as SpecForge trains; the ratio ours / SpecForge is reported per T. It needs
CUDA (flex attention): on the CPU it is skipped with a message. Results: --out/bench_stage3.json (rewritten after
every row) and a table on stdout. An out-of-memory at one T is recorded and the sweep goes on.
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.logs import get_logger, setup_logging  # noqa: E402

log = get_logger("bench3")
GIB = 1024 ** 3
LLAMA_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
SHAPES = {  # target config.json (what the trainer reads), draft vocab, default lengths, SpecForge's draft config
    "llama-3.1-8b": dict(
        target=dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                    num_hidden_layers=32, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
                    rope_scaling=LLAMA_ROPE),
        draft_vocab=32000, lengths=[8192, 16384, 32768, 65536, 131072], specforge="configs/llama3-8B-eagle3.json"),
    "gpt-oss-120b": dict(
        target=dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", hidden_size=2880,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, intermediate_size=17280,
                    vocab_size=201088, num_hidden_layers=36, rms_norm_eps=1e-5, max_position_embeddings=131072,
                    rope_theta=150000.0),
        draft_vocab=32000, lengths=[8192, 32768, 131072], specforge="configs/gpt-oss-120B-eagle3.json"),
    "tiny": dict(  # CPU smoke test / tests/test_bench_stage3.py
        target=dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=96, num_hidden_layers=8,
                    rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=10000.0),
        draft_vocab=64, lengths=[64], specforge=None),
}
# SpecForge imports these at module level for paths its single-GPU flex-attention step never runs (USP sequence
# parallelism, SGLang serving); when one is missing it gets an empty stand-in module.
OPTIONAL_MODULES = ("yunchang", "sglang", "flash_attn")


def make_target(folder: Path, target_cfg: dict, seed: int = 0) -> Path:
    """A fake target: config.json + model.safetensors holding only a random embed_tokens [V, H] (bf16)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(target_cfg))
    g = torch.Generator().manual_seed(seed)
    embed = (torch.randn(target_cfg["vocab_size"], target_cfg["hidden_size"], generator=g) * 0.02).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": embed}, str(folder / "model.safetensors"))
    return folder


def make_shards(folder: Path, target_cfg: dict, T: int, rows: int, draft_vocab: int, seed: int = 0) -> Path:
    """`rows` conversations of T tokens as a complete stage-2 shard set (shards, vocab.safetensors, manifest)."""
    from common.target import aux_layer_ids
    from stage2_hidden.format import make_schema
    from stage2_hidden.shards import ShardWriter, write_manifest
    from stage2_hidden.vocab import build_and_save_vocab

    folder.mkdir(parents=True, exist_ok=True)
    H, V = target_cfg["hidden_size"], target_cfg["vocab_size"]
    layer_ids = aux_layer_ids(None, target_cfg["num_hidden_layers"], "bench")
    writer = ShardWriter(folder, 0, make_schema(len(layer_ids) * H, layer_ids))
    g = torch.Generator().manual_seed(seed)
    for r in range(rows):
        hidden = torch.randn(T, len(layer_ids) * H, generator=g).to(torch.bfloat16)
        writer.write_row(f"bench-{T}-{r}", torch.randint(0, V, (T,), generator=g, dtype=torch.int32),
                         torch.ones(T, dtype=torch.uint8),
                         torch.randint(0, draft_vocab, (T,), generator=g, dtype=torch.int32), hidden)
    info = writer.close()
    fields = {"layer_ids": layer_ids, "num_aux_layers": len(layer_ids), "hidden_size": H, "vocab_size": V,
              "dtype": "bfloat16", "draft_vocab_size": draft_vocab, "max_length": T, "target": {"name": "bench"}}
    fields["coverage"] = build_and_save_vocab(folder, [info["file"]], V, draft_vocab)
    write_manifest(folder, [info], fields)
    return folder


def parse_settings(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs -> TrainConfig overrides; VALUE parsed as JSON when it is JSON (true, 3, "x")."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def bench_config(shards: Path, out: Path, T: int, steps: int, device: str, ac: str, ttt: int,
                 settings: dict | None = None):
    """The TrainConfig of one benchmark row: one row of T tokens per step, no validation, checkpoint or export;
    `settings` (--set) are more TrainConfig fields (activation_checkpointing, ttt_steps, ...), checked by TrainConfig."""
    from stage3_train.config import TrainConfig

    ac_value = {"auto": "auto", "on": True, "off": False}[ac]
    fields = dict(input=str(shards), output=str(out), max_tokens=T, batch_rows=1, grad_accum=1, ttt_steps=ttt,
                  steps=steps, warmup_steps=1, lr=1e-4, log_every=1, eval_every=0, ckpt_every=0,
                  val_fraction=0.0, export=False, activation_checkpointing=ac_value, device=device,
                  param_dtype="bfloat16" if device == "cuda" else "float32",
                  pad_multiple=16 if T < 1024 else 64)
    return TrainConfig.from_dict(fields | (settings or {}))


def profile_step(step_fn, device: torch.device, path: Path, rows: int = 40) -> None:
    """One more step under torch.profiler: the kernels' self time table (top `rows`) -> `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step_fn()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90))
    log.info(f"profile of one step -> {path}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, device: torch.device, warmup: int, iters: int) -> tuple[list[float], list[float], float]:
    """(step seconds, losses, peak GiB) of warmup + iters calls of step_fn() -> loss (peak over the timed ones)."""
    losses, times = [], []
    for _ in range(warmup):
        losses.append(step_fn())
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(iters):
        t0 = time.perf_counter()
        losses.append(step_fn())
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GIB
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return times, losses, peak


def run_ours(world, shards: Path, target: Path, out: Path, T: int, args) -> tuple[dict, object]:
    """The trainer's own step on the shards of T tokens -> (result row, the trainer's draft config)."""
    from stage3_train.metrics import peak_flops
    from stage3_train.model import num_flops_per_token
    from stage3_train.train import Trainer

    cfg = bench_config(shards, out, T, args.warmup + args.iters + int(args.profile), world.device.type, args.ac,
                       args.ttt, parse_settings(args.set))
    trainer = Trainer(cfg, {"path": str(target), "name": "bench"}, world)
    trainer.open_batches()
    try:
        def step() -> float:
            stats, _ = trainer.train_step()
            return stats.summarize(cfg.step_decay)["loss"]

        times, losses, peak_gib = time_steps(step, world.device, args.warmup, args.iters)
        if args.profile:
            profile_step(step, world.device, Path(args.out) / f"profile-{out.parent.name}-{T}.txt")
    finally:
        trainer.batches.close()
        trainer.metrics.close()
    s = sorted(times)[len(times) // 2]
    flops = num_flops_per_token(trainer.draft_cfg, args.ttt, T)
    peak = peak_flops(world.device, args.peak_tflops)
    row = {"s_per_step": s, "tokens_per_s": T / s, "peak_gib": peak_gib, "mfu": flops * T / s / peak if peak else None,
           "activation_checkpointing": trainer.ac, "losses": losses, "config": cfg.to_dict()}
    return row, trainer.draft_cfg  # the trainer (model, optimizer) is freed when this frame goes


def import_specforge(folder: str):
    """SpecForge's EAGLE-3 training model and Llama draft, imported from `folder` (a checkout on sys.path)."""
    import importlib
    import types

    sys.path.insert(0, str(Path(folder).resolve()))
    for _ in range(16):
        try:
            model = importlib.import_module("specforge.algorithms.eagle3.model")
            draft = importlib.import_module("specforge.modeling.draft.llama3_eagle")
            return model.OnlineEagle3Model, draft.LlamaForCausalLMEagle3
        except ModuleNotFoundError as e:
            name = e.name or ""
            if name.split(".")[0] not in OPTIONAL_MODULES:
                raise
            log.info(f"SpecForge imports {name}, unused by its flex-attention training step: empty stand-in")
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    raise ImportError("SpecForge import kept failing on optional modules")


def specforge_step(folder: str, shape: dict, T: int, ttt: int):
    """SpecForge's training step on random data of our shapes: OnlineEagle3Model(flex_attention) forward,
    sum_i 0.8^i ploss_i backward, clip 0.5, AdamW. Returns step_fn() -> loss."""
    from transformers import LlamaConfig

    OnlineEagle3Model, LlamaForCausalLMEagle3 = import_specforge(folder)
    cfg = LlamaConfig.from_json_file(str(Path(folder) / shape["specforge"]))
    cfg.max_position_embeddings = max(int(cfg.max_position_embeddings), T)
    V, Vd, Ht = cfg.vocab_size, cfg.draft_vocab_size, shape["target"]["hidden_size"]
    torch.manual_seed(0)
    draft = LlamaForCausalLMEagle3(cfg, attention_backend="flex_attention").cuda().to(torch.bfloat16)
    with torch.no_grad():
        draft.t2d.zero_()
        draft.t2d[:Vd] = True  # the draft vocab = the first Vd target ids (identity d2t), as in our shards
        draft.d2t.zero_()
    draft.embed_tokens.weight.requires_grad_(False)
    model = OnlineEagle3Model(draft, length=ttt, attention_backend="flex_attention")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    dev = "cuda"
    batch = dict(input_ids=torch.randint(0, V, (1, T), device=dev), attention_mask=None,
                 target=torch.randn(1, T, V, device=dev, dtype=torch.bfloat16),  # its default full-logits teacher
                 loss_mask=torch.ones(1, T, 1, device=dev, dtype=torch.bfloat16),
                 hidden_states=torch.randn(1, T, 3 * Ht, device=dev, dtype=torch.bfloat16))

    def step() -> float:
        plosses = model(**batch)[0]
        loss = sum(0.8 ** i * p for i, p in enumerate(plosses))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def run_specforge(args, shape: dict, T: int, flops_per_token: float, peak: float | None) -> dict:
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        return {"skipped": "SpecForge's step needs CUDA (flex attention); CPU run: skipped"}
    if not shape["specforge"]:
        return {"skipped": "no SpecForge config for this shape"}
    try:
        times, losses, peak_gib = time_steps(specforge_step(args.specforge, shape, T, args.ttt),
                                             torch.device("cuda"), args.warmup, args.iters)
    except torch.OutOfMemoryError:
        return {"oom": True}
    s = sorted(times)[len(times) // 2]
    return {"s_per_step": s, "tokens_per_s": T / s, "peak_gib": peak_gib, "losses": losses,
            "mfu": flops_per_token * T / s / peak if peak else None}


def _free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_row(world, args, name: str, shape: dict, T: int, work: Path) -> dict:
    from stage3_train.metrics import peak_flops
    from stage3_train.model import num_flops_per_token

    target = make_target(work / name / "target", shape["target"])
    shards = make_shards(work / name / f"shards-{T}", shape["target"], T, args.rows, shape["draft_vocab"])
    row: dict = {"shape": name, "tokens": T}
    try:
        row["ours"], draft_cfg = run_ours(world, shards, target, work / name / f"run-{T}", T, args)
    except torch.OutOfMemoryError:
        row["ours"], draft_cfg = {"oom": True}, None
    _free_device()
    if not args.keep_shards:
        shutil.rmtree(shards, ignore_errors=True)
    if args.specforge:
        flops = num_flops_per_token(draft_cfg, args.ttt, T) if draft_cfg else 0.0
        row["specforge"] = run_specforge(args, shape, T, flops, peak_flops(world.device, args.peak_tflops))
        _free_device()
        if "skipped" in row["specforge"]:
            log.info(row["specforge"]["skipped"])
        elif "tokens_per_s" in row["specforge"] and "tokens_per_s" in row["ours"]:
            row["ratio"] = row["ours"]["tokens_per_s"] / row["specforge"]["tokens_per_s"]
    return row


def _cell(r: dict | None) -> str:
    if not r:
        return ""
    if "tokens_per_s" not in r:
        return "out of memory" if r.get("oom") else r.get("skipped", "")
    mfu = f", MFU {r['mfu']:.2f}" if r.get("mfu") is not None else ""
    return f"{r['tokens_per_s']:,.0f} tok/s ({r['peak_gib']:.1f} GiB{mfu})"


def print_table(report: dict) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, TTT {report['args']['ttt']}")
    print("| shape | tokens | AC | ours | SpecForge | ours / SpecForge |\n| --- | --- | --- | --- | --- | --- |")
    for r in report["rows"]:
        ac = r["ours"].get("activation_checkpointing")
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        print(f"| {r['shape']} | {r['tokens']:,} | {'' if ac is None else 'on' if ac else 'off'} | "
              f"{_cell(r['ours'])} | {_cell(r.get('specforge'))} | {ratio} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["llama-3.1-8b", "gpt-oss-120b"], choices=sorted(SHAPES))
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="row lengths T (default: per shape)")
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--ac", choices=["auto", "on", "off"], default="auto", help="train.activation_checkpointing")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rows", type=int, default=2, help="conversations per shard set (the loader cycles them)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: metrics table)")
    p.add_argument("--specforge", default=None, help="a SpecForge checkout: run its step side by side")
    p.add_argument("--work", default=None, help="scratch folder for shards and targets (default: --out/work)")
    p.add_argument("--keep-shards", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig field for our step, e.g. --set grad_clip=1.0 --set step_decay=0.7")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one more step: --out/profile-SHAPE-T.txt (kernel self times)")
    p.add_argument("--out", required=True, help="results folder (bench_stage3.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from common.distributed import init_world

    args = parse_args(argv)
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    world = init_world(args.device)
    device_name = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu"
    report: dict = {"device": device_name, "torch": torch.__version__, "args": vars(args), "rows": []}
    try:
        for name in args.shape:
            for T in args.lengths or SHAPES[name]["lengths"]:
                row = bench_row(world, args, name, SHAPES[name], T, work)
                report["rows"].append(row)
                log.info(json.dumps({k: v for k, v in row.items() if k != "ours"} | {
                    "ours": {k: v for k, v in row["ours"].items() if k != "config"}}))
                (out / "bench_stage3.json").write_text(json.dumps(report, indent=1))
    finally:
        world.close()
    print_table(report)
    return report


if __name__ == "__main__":
    main()
