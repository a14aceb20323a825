"""Serving benchmark (`make bench-serve`): the same vLLM target without and with the EAGLE-3 draft.

    python -m evaluation.serve bench.draft=data/train/smollm2-135m/export        (hydra, conf/bench_serve.yaml)
    python -m evaluation.serve bench.concurrency=[1,2,4,8,16,32,64] bench.num_speculative_tokens=[1,2,3,4,5]
    python -m evaluation.serve --plain --target PATH --draft PATH ...            (argparse: no hydra)

Servers: a baseline (no speculation) and one per k in ``bench.num_speculative_tokens`` (``--speculative-config
{"method": "eagle3", "model": DRAFT, "num_speculative_tokens": k}``), started with stage 1's launcher on 127.0.0.1
and stopped afterwards. On a GPU they start together, each with its share of the card (their compilations
overlap: one start-up's wait instead of 1 + len(k)), and are measured one after another, so an idle server is all
that runs beside the one being timed; on a CPU they start one at a time (each takes ~3 GB of host memory).

For each server and concurrency c it sends the same prompts (MT-bench first turns by default, temperature 0) with c
requests in flight and measures

    output tokens/s         = sum of completion tokens / wall time of the pass
    time per output token   = mean over requests of (request latency / its completion tokens)  [TPOT, ms]

and around each pass scrapes `/metrics`; the counter deltas give (vLLM's own definitions):

    acceptance length       = 1 + accepted / drafts       (tokens per target forward of a speculating request)
    acceptance at pos. i    = accepted_per_pos[i] / drafts (i = 0..k-1)
    draft acceptance rate   = accepted / draft_tokens

Reports: ${bench.output}/bench_serve.json, bench_serve.md (per concurrency: both rates, speedup, acceptance length,
TPOT, the k that serves fastest, and whether the greedy outputs of the two servers agree token for token), logs.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from common.entry import dataclass_command
from common.files import atomic_write_json, atomic_write_text
from common.logs import get_logger
from common.server import (VLLMServer, cuda_available, free_port, install_signal_handlers, stop_servers,
                           vllm_command)
from evaluation.prompts import load_prompts, messages_for

log = get_logger("bench")

SPEC_COUNTERS = {  # Prometheus sample names of vLLM's (v1) speculative-decoding counters
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted": "vllm:spec_decode_num_accepted_tokens_total",
}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"


@dataclass
class ServeBenchConfig:
    target: str = "data/models/SmolLM2-135M-Instruct"   # HF folder (or hub id) vLLM serves
    served_name: str = "smollm2-135m"                    # --served-model-name
    draft: str = "data/train/smollm2-135m/export"       # EAGLE-3 export folder
    output: str = "data/bench/smollm2-135m"              # reports and server logs
    num_speculative_tokens: list[int] = field(default_factory=lambda: [3])  # k values, one server each
    prompts: str = "mtbench"                             # prompt set (prompts.load_prompts): first user turns
    num_prompts: int | None = None                       # first N prompts (None = all; MT-bench: 80)
    max_tokens: int = 256                                # per request
    concurrency: list[int] = field(default_factory=lambda: [1, 4])  # requests in flight, one pass each
    baseline: bool = True                                # also run the server without speculation
    warmup_requests: int = 2                             # short requests before measuring (compilation, caches)
    max_model_len: int = 4096
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    extra_args: list[str] = field(default_factory=list)  # more vLLM flags (both servers)
    env: dict[str, str] = field(default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "2"})
    port: int = 0                                        # 0 = a free port (several servers: port, port+1, ...)
    start_together: bool | None = None                   # start every server at once; None = on a GPU
    gpu_memory_utilization: float | None = None          # GPU share of each server; None = 0.9 / servers together
    startup_timeout: float = 900.0                       # seconds to wait for /health
    request_timeout: float = 600.0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ks = self.num_speculative_tokens
        self.num_speculative_tokens = [int(k) for k in (ks if isinstance(ks, (list, tuple)) else [ks])]
        if not self.num_speculative_tokens or min(self.num_speculative_tokens) < 1:
            raise ValueError(f"bench.num_speculative_tokens must be an int >= 1 or a list of them, got {ks}")
        if not self.concurrency or any(int(c) < 1 for c in self.concurrency):
            raise ValueError(f"bench.concurrency must be a non-empty list of ints >= 1, got {self.concurrency}")
        if self.max_tokens < 1:
            raise ValueError(f"bench.max_tokens must be >= 1, got {self.max_tokens}")
        if not (Path(self.draft) / "config.json").is_file():
            raise ValueError(f"bench.draft={self.draft} is not an export folder (no config.json); export a "
                             "checkpoint first: python -m stage3_train.export CKPT OUT")


# ---------------------------------------------------------------- /metrics
def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition -> {(sample name, sorted labels): value}. prometheus_client's parser when
    installed (vLLM depends on it), else a small one for the `name{k="v",...} value` lines."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return _parse_metrics_plain(text)
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _parse_metrics_plain(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not (m := _LINE.match(line.strip())):
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def spec_counters(samples: dict, model_name: str | None = None) -> dict[str, Any]:
    """Totals of the speculative counters (summed over engines), and accepted per position [k]."""
    def keep(labels) -> bool:
        return model_name is None or dict(labels).get("model_name", model_name) == model_name

    totals = {key: sum(v for (n, lab), v in samples.items() if n == name and keep(lab))
              for key, name in SPEC_COUNTERS.items()}
    per_pos: dict[int, float] = {}
    for (n, lab), v in samples.items():
        if n == PER_POS and keep(lab):
            pos = int(dict(lab)["position"])
            per_pos[pos] = per_pos.get(pos, 0.0) + v
    totals["per_pos"] = [per_pos[i] for i in sorted(per_pos)]
    return totals


def acceptance_from_counters(before: dict[str, Any], after: dict[str, Any], k: int) -> dict[str, Any]:
    """Acceptance over the window between two `spec_counters` snapshots; ValueError if the counters are
    inconsistent (they must satisfy 0 <= accepted <= k * drafts and sum(per_pos) == accepted)."""
    d = {key: after[key] - before[key] for key in SPEC_COUNTERS}
    per_pos = [a - b for a, b in zip(after["per_pos"], before["per_pos"] or [0.0] * len(after["per_pos"]))]
    drafts = d["drafts"]
    per_pos_ok = not per_pos or abs(sum(per_pos) - d["accepted"]) <= 1e-6
    if drafts < 0 or not 0 <= d["accepted"] <= k * drafts + 1e-6 or not per_pos_ok:
        raise ValueError(f"inconsistent speculative counters: drafts {drafts}, accepted {d['accepted']}, "
                         f"per position {per_pos}, k {k}")
    return {"drafts": int(drafts), "draft_tokens": int(d["draft_tokens"]), "accepted": int(d["accepted"]),
            "acceptance_length": 1.0 + d["accepted"] / drafts if drafts else None,
            "per_position": [p / drafts for p in per_pos] if drafts else [],
            "draft_acceptance_rate": d["accepted"] / d["draft_tokens"] if d["draft_tokens"] else None}


def scrape(url: str) -> tuple[dict[str, Any], str]:
    """(spec_counters of the server's /metrics, the raw text)."""
    resp = httpx.get(url.rstrip("/") + "/metrics", timeout=30.0)
    resp.raise_for_status()
    return spec_counters(parse_metrics(resp.text)), resp.text


# ---------------------------------------------------------------- load
async def _send_all(url: str, cfg: ServeBenchConfig, conversations: list[list[dict]], concurrency: int
                    ) -> dict[str, Any]:
    """All conversations with `concurrency` in flight: completion token ids per request, tokens, wall seconds and
    each request's seconds per output token."""
    from stage1_sample.client import ChatClient, api_key_from_env

    sem = asyncio.Semaphore(concurrency)
    async with ChatClient([url], cfg.served_name, timeout=cfg.request_timeout, max_retries=2,
                          api_key=api_key_from_env()) as client:
        async def one(messages):
            async with sem:
                t0 = time.perf_counter()
                r = await client.chat(messages, temperature=0.0, max_tokens=cfg.max_tokens, seed=0,
                                      chat_template_kwargs=cfg.chat_template_kwargs or None)
                return r, time.perf_counter() - t0

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(m) for m in conversations))
        wall = time.perf_counter() - t0
    return {"ids": [list(r.message.get("completion_token_ids", [])) for r, _ in results],
            "tokens": sum(r.num_completion_tokens for r, _ in results), "wall": wall,
            "tpot": [dt / r.num_completion_tokens for r, dt in results if r.num_completion_tokens]}


def bench_server(url: str, cfg: ServeBenchConfig, conversations: list[list[dict]], name: str, k: int | None
                 ) -> dict[str, Any]:
    """Warm-up, then one pass per concurrency: tokens/s, TPOT and (speculative server, k drafts) acceptance."""
    if cfg.warmup_requests:
        warm = dataclasses.replace(cfg, max_tokens=16)
        asyncio.run(_send_all(url, warm, conversations[: cfg.warmup_requests], cfg.warmup_requests))
    passes = {}
    for c in cfg.concurrency:
        before, _ = scrape(url)
        sent = asyncio.run(_send_all(url, cfg, conversations, int(c)))
        after, text = scrape(url)
        atomic_write_text(Path(cfg.output) / f"metrics-{name}.txt", text)   # the last raw /metrics, for inspection
        tokens, wall = sent["tokens"], sent["wall"]
        entry: dict[str, Any] = {"requests": len(conversations), "output_tokens": tokens, "wall_s": round(wall, 3),
                                 "output_tokens_per_s": round(tokens / wall, 2),
                                 "tpot_ms": round(1000 * sum(sent["tpot"]) / max(len(sent["tpot"]), 1), 3),
                                 "completion_ids": sent["ids"]}
        if k is not None:
            entry["spec"] = acceptance_from_counters(before, after, k)
        passes[str(c)] = entry
        log.info(f"{name} c={c}: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s, TPOT "
                 f"{entry['tpot_ms']:.2f} ms" + (f", acceptance length {entry['spec']['acceptance_length']}"
                                                  if k is not None else ""))
    return passes


# ---------------------------------------------------------------- servers and report
def server_plan(cfg: ServeBenchConfig) -> list[tuple[str, int | None]]:
    """(name, k) of each server: the baseline (k None) when asked, then one per k."""
    return ([("baseline", None)] if cfg.baseline else []) + [(f"eagle3-k{k}", k) for k in cfg.num_speculative_tokens]


def _speculative_args(draft: str, k: int) -> list[str]:
    spec = {"method": "eagle3", "model": str(Path(draft).resolve()), "num_speculative_tokens": int(k)}
    return ["--speculative-config", json.dumps(spec)]


def server_commands(cfg: ServeBenchConfig, together: bool, gpu: bool | None = None
                    ) -> list[tuple[str, int | None, int, list[str]]]:
    """(name, k, port, command) of every server; started together, each takes an equal share of the GPU."""
    plan = server_plan(cfg)
    share = cfg.gpu_memory_utilization or (round(0.9 / len(plan), 4) if together else None)
    out = []
    for i, (name, k) in enumerate(plan):
        port = cfg.port + i if cfg.port else free_port()
        extra = list(cfg.extra_args) + (_speculative_args(cfg.draft, k) if k is not None else [])
        cmd = vllm_command(cfg.target, cfg.served_name, port, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                           trust_remote_code=cfg.trust_remote_code, extra_args=extra, gpu=gpu,
                           gpu_memory_utilization=share)
        out.append((name, k, port, cmd))
    return out


def _server(cfg: ServeBenchConfig, name: str, port: int, cmd: list[str]) -> VLLMServer:
    return VLLMServer(cmd, port=port, env=cfg.env, log_file=Path(cfg.output) / f"server-{name}.log",
                      startup_timeout=cfg.startup_timeout)


def run_servers(cfg: ServeBenchConfig, conversations: list[list[dict]], save: Callable[[dict], None]
                ) -> dict[str, Any]:
    """Every server of ``server_plan``, measured one after another; ``save`` gets the results after each."""
    together = cuda_available() if cfg.start_together is None else cfg.start_together
    planned = server_commands(cfg, together)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        running: dict[str, VLLMServer] = {}
        if together:
            log.info(f"starting {len(planned)} servers together: {', '.join(name for name, *_ in planned)}")
            started: list[VLLMServer] = []
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


def serve_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per concurrency: every k's figures (tokens/s, TPOT, speedup, acceptance, identical outputs) under ``by_k``,
    and the k that served fastest (``best_k``) with its figures at the top level beside the baseline's."""
    ks = sorted(int(name.rsplit("-k", 1)[1]) for name in results if name.startswith("eagle3-k"))
    rows = {}
    for c in results[f"eagle3-k{ks[0]}"]["passes"]:
        base = results.get("baseline", {}).get("passes", {}).get(c)
        by_k = {}
        for k in ks:
            spec = results[f"eagle3-k{k}"]["passes"][c]
            entry = {"eagle3_tokens_per_s": spec["output_tokens_per_s"], "eagle3_tpot_ms": spec.get("tpot_ms"),
                     **{key: spec["spec"][key] for key in
                        ("acceptance_length", "per_position", "drafts", "accepted", "draft_acceptance_rate")}}
            if base:
                entry["speedup"] = round(spec["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
                same = sum(a == b for a, b in zip(base["completion_ids"], spec["completion_ids"]))
                entry["identical_outputs"] = f"{same}/{len(spec['completion_ids'])}"
            by_k[str(k)] = entry
        best = max(by_k, key=lambda k: by_k[k]["eagle3_tokens_per_s"])
        row = {"best_k": int(best), **by_k[best], "by_k": by_k}
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
        lines += ["", "| concurrency | " + " | ".join(f"k={k}: {key.replace('_', ' ')} (acceptance length)"
                                                     for k in ks) + " |", "| --- |" + " --- |" * len(ks)]
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
