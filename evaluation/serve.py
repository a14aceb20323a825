"""Serving benchmark (`make bench-serve`): the same vLLM target without and with the EAGLE-3 draft.

    python -m evaluation.serve bench.draft=data/train/smollm2-135m/export        (hydra, conf/bench_serve.yaml)
    python -m evaluation.serve bench.concurrency=[1,4] bench.num_speculative_tokens=3 bench.num_prompts=20
    python -m evaluation.serve --plain --target PATH --draft PATH ...            (argparse: no hydra)

For each server (baseline: no speculation; eagle3: `--speculative-config {"method": "eagle3", "model": DRAFT,
"num_speculative_tokens": k}`), started with stage 1's launcher on 127.0.0.1 and stopped afterwards, and for each
concurrency c, it sends the same prompts (MT-bench first turns by default, temperature 0) with c requests in flight
and measures output tokens/s = sum of completion tokens / wall time. Around each pass it scrapes `/metrics`; the
counter deltas give (vLLM's own definitions):

    acceptance length       = 1 + accepted / drafts       (tokens per target forward of a speculating request)
    acceptance at pos. i    = accepted_per_pos[i] / drafts (i = 0..k-1)
    draft acceptance rate   = accepted / draft_tokens

Reports: ${bench.out}/bench_serve.json, bench_serve.md (a table), server logs; plus the speedup per concurrency and
whether the greedy outputs of the two servers agree token for token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common.entry import dataclass_command
from common.files import atomic_write_json, atomic_write_text
from common.logs import get_logger
from common.server import VLLMServer, free_port, install_signal_handlers, vllm_command
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
    out: str = "data/bench/smollm2-135m"                 # reports and server logs
    num_speculative_tokens: int = 3                      # k
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
    port: int = 0                                        # 0 = a free port
    startup_timeout: float = 900.0                       # seconds to wait for /health
    request_timeout: float = 600.0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 1:
            raise ValueError(f"bench.num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
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
                    ) -> tuple[list[list[int]], int, float]:
    """All conversations with `concurrency` in flight: (completion token ids per request, tokens, wall seconds)."""
    from stage1_sample.client import ChatClient, api_key_from_env

    sem = asyncio.Semaphore(concurrency)
    async with ChatClient([url], cfg.served_name, timeout=cfg.request_timeout, max_retries=2,
                          api_key=api_key_from_env()) as client:
        async def one(messages):
            async with sem:
                return await client.chat(messages, temperature=0.0, max_tokens=cfg.max_tokens, seed=0,
                                         chat_template_kwargs=cfg.chat_template_kwargs or None)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(m) for m in conversations))
        wall = time.perf_counter() - t0
    ids = [list(r.message.get("completion_token_ids", [])) for r in results]
    return ids, sum(r.num_completion_tokens for r in results), wall


def bench_server(url: str, cfg: ServeBenchConfig, conversations: list[list[dict]], speculative: bool
                 ) -> dict[str, Any]:
    """Warm-up, then one pass per concurrency: tokens/s and (speculative server) acceptance from /metrics."""
    if cfg.warmup_requests:
        warm = dataclasses.replace(cfg, max_tokens=16)
        asyncio.run(_send_all(url, warm, conversations[: cfg.warmup_requests], cfg.warmup_requests))
    passes = {}
    name = "eagle3" if speculative else "baseline"
    for c in cfg.concurrency:
        before, _ = scrape(url)
        ids, tokens, wall = asyncio.run(_send_all(url, cfg, conversations, int(c)))
        after, text = scrape(url)
        atomic_write_text(Path(cfg.out) / f"metrics-{name}.txt", text)   # the last raw /metrics, for inspection
        entry: dict[str, Any] = {"requests": len(conversations), "output_tokens": tokens, "wall_s": round(wall, 3),
                                 "output_tokens_per_s": round(tokens / wall, 2), "completion_ids": ids}
        if speculative:
            entry["spec"] = acceptance_from_counters(before, after, cfg.num_speculative_tokens)
        passes[str(c)] = entry
        log.info(f"{name} c={c}: {tokens} tokens in {wall:.1f} s = "
              f"{tokens / wall:.1f} tok/s" + (f", acceptance length {entry['spec']['acceptance_length']}"
                                                if speculative else ""))
    return passes


# ---------------------------------------------------------------- servers and report
def _speculative_args(cfg: ServeBenchConfig) -> list[str]:
    spec = {"method": "eagle3", "model": str(Path(cfg.draft).resolve()),
            "num_speculative_tokens": int(cfg.num_speculative_tokens)}
    return ["--speculative-config", json.dumps(spec)]


def run_server(cfg: ServeBenchConfig, conversations: list[list[dict]], speculative: bool) -> dict[str, Any]:
    port = cfg.port or free_port()
    extra = list(cfg.extra_args) + (_speculative_args(cfg) if speculative else [])
    cmd = vllm_command(cfg.target, cfg.served_name, port, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                       trust_remote_code=cfg.trust_remote_code, extra_args=extra)
    name = "eagle3" if speculative else "baseline"
    log_file = Path(cfg.out) / f"server-{name}.log"
    log.info(f"starting the {name} server (log: {log_file})")
    with VLLMServer(cmd, port=port, env=cfg.env, log_file=log_file, startup_timeout=cfg.startup_timeout) as server:
        return {"command": cmd, "passes": bench_server(server.url, cfg, conversations, speculative)}


def serve_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per concurrency: tokens/s of both servers, the speedup, acceptance, and whether the outputs agree."""
    rows = {}
    for c, spec in results["eagle3"]["passes"].items():
        base = results.get("baseline", {}).get("passes", {}).get(c)
        row = {"eagle3_tokens_per_s": spec["output_tokens_per_s"], **{k: spec["spec"][k] for k in
               ("acceptance_length", "per_position", "drafts", "accepted", "draft_acceptance_rate")}}
        if base:
            row["baseline_tokens_per_s"] = base["output_tokens_per_s"]
            row["speedup"] = round(spec["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
            same = sum(a == b for a, b in zip(base["completion_ids"], spec["completion_ids"]))
            row["identical_outputs"] = f"{same}/{len(spec['completion_ids'])}"
        rows[c] = row
    return rows


def serve_table(summary: dict[str, Any], k: int) -> str:
    lines = [f"| concurrency | baseline tok/s | eagle3 (k={k}) tok/s | speedup | acceptance length | "
             "per-position acceptance | identical outputs |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c, r in summary.items():
        acc = r["acceptance_length"]
        lines.append(f"| {c} | {r.get('baseline_tokens_per_s', '-')} | {r['eagle3_tokens_per_s']} | "
                     f"{r.get('speedup', '-')} | {'-' if acc is None else f'{acc:.3f}'} | "
                     f"{' / '.join(f'{p:.3f}' for p in r['per_position'])} | {r.get('identical_outputs', '-')} |")
    return "\n".join(lines)


def run(cfg: ServeBenchConfig) -> dict[str, Any]:
    install_signal_handlers()
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, turns="first")
    conversations = [messages_for(p, []) for p in prompts]
    out = Path(cfg.out)
    report: dict[str, Any] = {"format": "eagle3-bench-serve/1", "config": dataclasses.asdict(cfg),
                              "prompts": [p.id for p in prompts], "results": {}}
    for speculative in ([False] if cfg.baseline else []) + [True]:
        report["results"]["eagle3" if speculative else "baseline"] = run_server(cfg, conversations, speculative)
        atomic_write_json(out / "bench_serve.json", {**report, "complete": False})
    report["summary"] = serve_summary(report["results"])
    table = serve_table(report["summary"], cfg.num_speculative_tokens)
    atomic_write_json(out / "bench_serve.json", {**report, "complete": True})
    atomic_write_text(out / "bench_serve.md", table + "\n")
    print(table)
    log.info(f"report {out / 'bench_serve.json'}")
    return report


# argparse CLI (machines without Hydra: every ServeBenchConfig field as --field) and the Hydra entry point
plain_args, main = dataclass_command(ServeBenchConfig, run, "bench_serve", "bench", "evaluation.serve")

if __name__ == "__main__":
    main()
