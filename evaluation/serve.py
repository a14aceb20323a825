"""Serving benchmark (`make bench-serve`): the same target without and with the EAGLE-3 draft, in vLLM or SGLang.

    python -m evaluation.serve bench.draft=data/train/smollm2-135m/export        (hydra, conf/bench_serve.yaml)
    python -m evaluation.serve bench.concurrency=[1,2,4,8,16,32,64] bench.num_speculative_tokens=[1,2,3,4,5]
    python -m evaluation.serve bench.engine=sglang bench.num_speculative_tokens=[3]          (SGLang, chain of 3)
    python -m evaluation.serve bench.engine=sglang bench.num_speculative_tokens=[] \
        'bench.sglang_tree=[{num_steps: 5, eagle_topk: 4, num_draft_tokens: 8}]'           (SGLang, a tree)
    python -m evaluation.serve --plain --target PATH --draft PATH ...            (argparse: no hydra)

Servers (`bench.engine`, evaluation/engines.py has what differs per engine): a baseline (no speculation) and one per
k in ``bench.num_speculative_tokens``: vLLM ``--speculative-config {"method": "eagle3", "model": DRAFT,
"num_speculative_tokens": k}``, SGLang ``--speculative-algorithm EAGLE3 --speculative-num-steps k
--speculative-eagle-topk 1 --speculative-num-draft-tokens k+1`` (its count includes the root token), plus for SGLang
one per tree in ``bench.sglang_tree``. They are started with stage 1's launcher on 127.0.0.1 and stopped
afterwards. vLLM on a GPU: they start together, each with its share of the card (their compilations overlap: one
start-up's wait instead of 1 + len(k)), and are measured one after another, so an idle server is all that runs
beside the one being timed; on a CPU they start one at a time (each takes ~3 GB of host memory). SGLang: always one
at a time (it keeps a fraction of the memory free at its start for itself, so servers cannot split a card).

For each server and concurrency c it sends the same prompts (MT-bench first turns by default, temperature 0) with c
requests in flight and measures

    output tokens/s         = sum of completion tokens / wall time of the pass
    time per output token   = mean over requests of (request latency / its completion tokens)  [TPOT, ms]

and, from the engine's own counters for exactly that pass (vLLM: /metrics counter deltas; SGLang: the requests'
spec_verify_ct / spec_num_correct_drafts, see evaluation/engines.py), vLLM's definitions:

    acceptance length       = 1 + accepted / drafts       (tokens per target forward of a speculating request)
    acceptance at pos. i    = accepted_per_pos[i] / drafts (i = 0..k-1)
    draft acceptance rate   = accepted / draft_tokens

Reports: ${bench.output}/bench_serve.json, bench_serve.md (per concurrency: both rates, speedup, acceptance length,
TPOT, the k that serves fastest, and whether the greedy outputs of the two servers agree token for token; SGLang
returns no token ids, so there its outputs are compared as text), logs.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.entry import dataclass_command
from common.files import atomic_write_json, atomic_write_text
from common.logs import get_logger
from common.server import ServerProcess, cuda_available, free_port, install_signal_handlers, stop_servers
from evaluation.engines import BENCH_ENGINES, Draft, draft_label, sglang_trees
from evaluation.prompts import load_prompts, messages_for

log = get_logger("bench")


@dataclass
class ServeBenchConfig:
    target: str = "data/models/SmolLM2-135M-Instruct"   # HF folder (or hub id) the engine serves
    served_name: str = "smollm2-135m"                    # --served-model-name
    draft: str = "data/train/smollm2-135m/export"       # EAGLE-3 export folder
    output: str = "data/bench/smollm2-135m"              # reports and server logs
    engine: str = "vllm"                                 # vllm | sglang (evaluation/engines.py)
    num_speculative_tokens: list[int] = field(default_factory=lambda: [3])  # k values, one server each
    # SGLang only: trees, one server each beside the chains above: {num_steps, eagle_topk, num_draft_tokens} or a list
    sglang_tree: dict[str, Any] | list[dict[str, Any]] | None = None
    prompts: str = "mtbench"                             # prompt set (prompts.load_prompts): first user turns
    num_prompts: int | None = None                       # first N prompts (None = all; MT-bench: 80)
    max_tokens: int = 256                                # per request
    concurrency: list[int] = field(default_factory=lambda: [1, 4])  # requests in flight, one pass each
    baseline: bool = True                                # also run the server without speculation
    warmup_requests: int = 2                             # short requests before measuring (compilation, caches)
    max_model_len: int = 4096
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    extra_args: list[str] = field(default_factory=list)  # more engine flags (every server)
    env: dict[str, str] = field(default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "2"})
    port: int = 0                                        # 0 = a free port (several servers: port, port+1, ...)
    start_together: bool | None = None                   # vLLM: start every server at once; None = on a GPU
    gpu_memory_utilization: float | None = None          # GPU share of each server; None = 0.9 / servers together
                                                         #   (SGLang: --mem-fraction-static when set)
    startup_timeout: float = 900.0                       # seconds to wait for /health
    request_timeout: float = 600.0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine not in BENCH_ENGINES:
            raise ValueError(f"bench.engine must be one of {sorted(BENCH_ENGINES)}, got {self.engine!r}")
        trees = sglang_trees(self.sglang_tree)
        if trees and self.engine != "sglang":
            raise ValueError("bench.sglang_tree is for bench.engine=sglang (vLLM drafts chains only)")
        if self.start_together and not BENCH_ENGINES[self.engine].shares_gpu:
            raise ValueError(f"bench.start_together: {BENCH_ENGINES[self.engine].label} servers run one at a time "
                             "(each keeps a fraction of the GPU memory free at its start for itself)")
        ks = self.num_speculative_tokens
        self.num_speculative_tokens = [int(k) for k in (ks if isinstance(ks, (list, tuple)) else [ks])]
        if not (self.num_speculative_tokens or trees) or min(self.num_speculative_tokens, default=1) < 1:
            raise ValueError(f"bench.num_speculative_tokens must be an int >= 1 or a list of them, got {ks}")
        if not self.concurrency or any(int(c) < 1 for c in self.concurrency):
            raise ValueError(f"bench.concurrency must be a non-empty list of ints >= 1, got {self.concurrency}")
        if self.max_tokens < 1:
            raise ValueError(f"bench.max_tokens must be >= 1, got {self.max_tokens}")
        if not (Path(self.draft) / "config.json").is_file():
            raise ValueError(f"bench.draft={self.draft} is not an export folder (no config.json); export a "
                             "checkpoint first: python -m stage3_train.export CKPT OUT")


# ---------------------------------------------------------------- load
async def _send_all(url: str, cfg: ServeBenchConfig, conversations: list[list[dict]], concurrency: int
                    ) -> dict[str, Any]:
    """All conversations with `concurrency` in flight: each request's output (completion token ids; text where the
    engine returns no ids) and meta_info (SGLang), tokens, wall seconds and each request's seconds per output
    token."""
    from stage1_sample.client import ChatClient, api_key_from_env

    engine = BENCH_ENGINES[cfg.engine]
    sem = asyncio.Semaphore(concurrency)
    async with ChatClient([url], cfg.served_name, timeout=cfg.request_timeout, max_retries=2,
                          api_key=api_key_from_env(), return_token_ids=engine.returns_token_ids,
                          extra_body=engine.request_fields) as client:
        async def one(messages):
            async with sem:
                t0 = time.perf_counter()
                r = await client.chat(messages, temperature=0.0, max_tokens=cfg.max_tokens, seed=0,
                                      chat_template_kwargs=cfg.chat_template_kwargs or None, parse=engine.parse)
                return r, time.perf_counter() - t0

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(m) for m in conversations))
        wall = time.perf_counter() - t0
    out = {"tokens": sum(r.num_completion_tokens for r, _ in results), "wall": wall,
           "tpot": [dt / r.num_completion_tokens for r, dt in results if r.num_completion_tokens],
           "meta": [r.message.get("meta_info") for r, _ in results]}
    if engine.returns_token_ids:
        out["ids"] = [list(r.message.get("completion_token_ids", [])) for r, _ in results]
    else:
        out["texts"] = [r.message.get("content", "") for r, _ in results]
    return out


def bench_server(url: str, cfg: ServeBenchConfig, conversations: list[list[dict]], name: str, k: int | None
                 ) -> dict[str, Any]:
    """Warm-up, then one pass per concurrency: tokens/s, TPOT and (speculative server, k draft steps) acceptance."""
    engine = BENCH_ENGINES[cfg.engine]
    if cfg.warmup_requests:
        warm = dataclasses.replace(cfg, max_tokens=16)
        asyncio.run(_send_all(url, warm, conversations[: cfg.warmup_requests], cfg.warmup_requests))
    passes = {}
    for c in cfg.concurrency:
        before, _ = engine.snapshot(url)
        sent = asyncio.run(_send_all(url, cfg, conversations, int(c)))
        after, text = engine.snapshot(url)
        atomic_write_text(Path(cfg.output) / f"metrics-{name}.txt", text)   # the last raw /metrics, for inspection
        tokens, wall = sent["tokens"], sent["wall"]
        entry: dict[str, Any] = {"requests": len(conversations), "output_tokens": tokens, "wall_s": round(wall, 3),
                                 "output_tokens_per_s": round(tokens / wall, 2),
                                 "tpot_ms": round(1000 * sum(sent["tpot"]) / max(len(sent["tpot"]), 1), 3)}
        entry.update({"completion_ids": sent["ids"]} if "ids" in sent else {"completion_texts": sent["texts"]})
        if k is not None:
            entry["spec"] = engine.acceptance(before, after, sent["meta"], k)
        passes[str(c)] = entry
        log.info(f"{name} c={c}: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s, TPOT "
                 f"{entry['tpot_ms']:.2f} ms" + (f", acceptance length {entry['spec']['acceptance_length']}"
                                                  if k is not None else ""))
    return passes


# ---------------------------------------------------------------- servers and report
def server_plan(cfg: ServeBenchConfig) -> list[tuple[str, Draft | None]]:
    """(name, draft) of each server: the baseline (None) when asked, one chain per k, then SGLang's trees."""
    drafts = [Draft(k) for k in cfg.num_speculative_tokens] + sglang_trees(cfg.sglang_tree)
    return ([("baseline", None)] if cfg.baseline else []) + [(d.name, d) for d in drafts]


def server_commands(cfg: ServeBenchConfig, together: bool, gpu: bool | None = None
                    ) -> list[tuple[str, int | None, int, list[str]]]:
    """(name, k, port, command) of every server; started together, each takes an equal share of the GPU."""
    engine = BENCH_ENGINES[cfg.engine]
    plan = server_plan(cfg)
    share = cfg.gpu_memory_utilization or (round(0.9 / len(plan), 4) if together else None)
    out = []
    for i, (name, draft) in enumerate(plan):
        port = cfg.port + i if cfg.port else free_port()
        out.append((name, None if draft is None else draft.k, port, engine.command(cfg, draft, port, share, gpu)))
    return out


def _server(cfg: ServeBenchConfig, name: str, port: int, cmd: list[str]) -> ServerProcess:
    engine = BENCH_ENGINES[cfg.engine]
    return ServerProcess(cmd, port=port, env=cfg.env, log_file=Path(cfg.output) / f"server-{name}.log",
                         startup_timeout=cfg.startup_timeout, name=engine.label, health_path=engine.health_path)


def run_servers(cfg: ServeBenchConfig, conversations: list[list[dict]], save: Callable[[dict], None]
                ) -> dict[str, Any]:
    """Every server of ``server_plan``, measured one after another; ``save`` gets the results after each."""
    together = BENCH_ENGINES[cfg.engine].shares_gpu and (cuda_available() if cfg.start_together is None
                                                          else cfg.start_together)
    planned = server_commands(cfg, together)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        running: dict[str, ServerProcess] = {}
        if together:
            log.info(f"starting {len(planned)} servers together: {', '.join(name for name, *_ in planned)}")
            started: list[ServerProcess] = []
            stack.callback(stop_servers, started)   # registered first: a failed start stops the others too
            for name, _, port, cmd in planned:
                started.append(_server(cfg, name, port, cmd))
                started[-1].start()
                running[name] = started[-1]
            for server in started:
                server.wait_healthy()
        for name, k, port, cmd in planned:
            if name in running:
                passes = bench_server(running[name].url, cfg, conversations, name, k)
            else:
                log.info(f"starting the {name} server (log: {Path(cfg.output) / f'server-{name}.log'})")
                with _server(cfg, name, port, cmd) as server:
                    passes = bench_server(server.url, cfg, conversations, name, k)
            results[name] = {"command": cmd, "passes": passes}
            save(results)
    return results


def _outputs(p: dict[str, Any]) -> list:
    """A pass's outputs as compared between servers: token ids (vLLM), else texts (SGLang)."""
    return p["completion_ids"] if "completion_ids" in p else p["completion_texts"]


def _label_order(label: str) -> tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def serve_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per concurrency: every draft's figures (tokens/s, TPOT, speedup, acceptance, identical outputs) under
    ``by_k`` (keyed by k for a chain, "stepsS-topkK-tokensM" for an SGLang tree), and the one that served fastest
    (``best_k``) with its figures at the top level beside the baseline's."""
    drafts = sorted(((draft_label(name), name) for name in results if name.startswith("eagle3-")),
                    key=lambda ln: _label_order(ln[0]))
    rows = {}
    for c in results[drafts[0][1]]["passes"]:
        base = results.get("baseline", {}).get("passes", {}).get(c)
        by_k = {}
        for label, name in drafts:
            spec = results[name]["passes"][c]
            entry = {"eagle3_tokens_per_s": spec["output_tokens_per_s"], "eagle3_tpot_ms": spec.get("tpot_ms"),
                     **{key: spec["spec"][key] for key in
                        ("acceptance_length", "per_position", "drafts", "accepted", "draft_acceptance_rate")}}
            if base:
                entry["speedup"] = round(spec["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
                same = sum(a == b for a, b in zip(_outputs(base), _outputs(spec)))
                entry["identical_outputs"] = f"{same}/{len(_outputs(spec))}"
            by_k[label] = entry
        best = max(by_k, key=lambda k: by_k[k]["eagle3_tokens_per_s"])
        row = {"best_k": int(best) if best.isdigit() else best, **by_k[best], "by_k": by_k}
        if base:
            row["baseline_tokens_per_s"] = base["output_tokens_per_s"]
            row["baseline_tpot_ms"] = base.get("tpot_ms")
        rows[c] = row
    return rows


def serve_table(summary: dict[str, Any]) -> str:
    """Per concurrency, the fastest k's figures; then, when several k were served, each k's rate per concurrency."""
    lines = ["| concurrency | baseline tok/s | EAGLE-3 tok/s | speedup | best k | acceptance length | "
             "per-position acceptance | TPOT ms (baseline -> EAGLE-3) | identical outputs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c, r in summary.items():
        acc = r["acceptance_length"]
        lines.append(f"| {c} | {r.get('baseline_tokens_per_s', '-')} | {r['eagle3_tokens_per_s']} | "
                     f"{r.get('speedup', '-')} | {r['best_k']} | {'-' if acc is None else f'{acc:.3f}'} | "
                     f"{' / '.join(f'{p:.3f}' for p in r['per_position'])} | "
                     f"{r.get('baseline_tpot_ms', '-')} -> {r['eagle3_tpot_ms']} | {r.get('identical_outputs', '-')} |")
    first = next(iter(summary.values()), None)
    if first and len(first["by_k"]) > 1:
        ks = list(first["by_k"])
        key = "speedup" if "speedup" in first["by_k"][ks[0]] else "eagle3_tokens_per_s"
        lines += ["", "| concurrency | " + " | ".join(f"{'k=' if k.isdigit() else ''}{k}: {key.replace('_', ' ')} "
                                                     "(acceptance length)" for k in ks) + " |",
                  "| --- |" + " --- |" * len(ks)]
        for c, r in summary.items():
            cells = [f"{r['by_k'][k][key]} ({r['by_k'][k]['acceptance_length'] or 0:.3f})" for k in ks]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: ServeBenchConfig) -> dict[str, Any]:
    install_signal_handlers()
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, turns="first")
    conversations = [messages_for(p, []) for p in prompts]
    out = Path(cfg.output)
    report: dict[str, Any] = {"format": "eagle3-bench-serve/2", "config": dataclasses.asdict(cfg),
                              "prompts": [p.id for p in prompts], "results": {}}

    def save(results: dict[str, Any]) -> None:   # after each server: a killed run keeps what it measured
        atomic_write_json(out / "bench_serve.json", {**report, "results": results, "complete": False})

    report["results"] = run_servers(cfg, conversations, save)
    report["summary"] = serve_summary(report["results"])
    table = serve_table(report["summary"])
    atomic_write_json(out / "bench_serve.json", {**report, "complete": True})
    atomic_write_text(out / "bench_serve.md", table + "\n")
    print(table)
    log.info(f"report {out / 'bench_serve.json'}")
    return report


# argparse CLI (machines without Hydra: every ServeBenchConfig field as --field) and the Hydra entry point
plain_args, main = dataclass_command(ServeBenchConfig, run, "bench_serve", "bench", "evaluation.serve")

if __name__ == "__main__":
    main()
