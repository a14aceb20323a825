"""What differs per engine in the serving benchmark (`evaluation.serve`): the server's command line, whether its
servers can share a GPU, what a request asks for, and how the acceptance of a pass is read from the engine's own
counters. One small class per engine (`BENCH_ENGINES`); prompts, passes, timing and the table are shared.

vLLM (v1): /metrics counters, differenced around each pass (vLLM's own definitions)

    acceptance length       = 1 + accepted / drafts       (tokens per target forward of a speculating request)
    acceptance at pos. i    = accepted_per_pos[i] / drafts (i = 0..k-1)
    draft acceptance rate   = accepted / draft_tokens

SGLang 0.5.15 (read in its wheel, sglang-0.5.15-cp312-cp312-manylinux_2_34_x86_64.whl, files under sglang/srt/):

- Server: `python -m sglang.launch_server --model-path T --served-model-name N --host H --port P --dtype D
  --context-length L --enable-metrics`; with the draft `--speculative-algorithm EAGLE3
  --speculative-draft-model-path DRAFT --speculative-num-steps S --speculative-eagle-topk K
  --speculative-num-draft-tokens M`. Chain drafting of k tokens is S = k, K = 1, M = k + 1: M counts the root (the
  last verified token) with the drafts, so SGLang's 4 is vLLM's k = 3 (arg_groups/speculative_hook.py resets M to
  S + 1 whenever K = 1). A tree (K > 1) verifies the M - 1 best of its K-wide candidates per step. Speculating
  servers are capped at 48 running requests unless `--max-running-requests` is given (same file): it is passed as the
  largest concurrency when that is above 48.
- Health: GET /health (entrypoints/http_server.py `health_generate`) answers 503 until the server's own warm-up
  request is done, then 200 (after a one-token generation, SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION being on).
- One server at a time: SGLang sizes its KV cache as `free memory now - (free memory at start-up) *
  (1 - mem_fraction_static)` (model_executor/model_runner_kv_cache_mixin.py `_profile_available_bytes`): each server
  keeps `1 - fraction` of the card free for itself, so two servers started together on one GPU fail as soon as one
  has allocated before the other profiles. `--mem-fraction-static` is passed only when `gpu_memory_utilization` is set.
- Acceptance, per request: a non-streaming chat request with `return_meta_info: true` gets its `meta_info` back on
  the choice (entrypoints/openai/serving_chat.py); on a speculating server it holds (managers/tokenizer_manager.py
  `_calculate_spec_decoding_metrics`; counted per verify step in managers/scheduler_components/
  batch_result_processor.py):
      spec_verify_ct                  target verify forwards of the request               (vLLM: drafts)
      spec_num_correct_drafts         draft tokens accepted in them, the bonus token not  (vLLM: accepted)
      spec_num_proposed_drafts        spec_verify_ct * (M - 1)                            (vLLM: draft tokens)
      spec_correct_drafts_histogram   [j] = verify steps that accepted j draft tokens
  Summed over one pass's requests these are true counters of exactly that pass, and give vLLM's definitions:
      acceptance length    = 1 + sum(correct) / sum(verify_ct)
      acceptance at pos. i = sum(hist[j] for j > i) / sum(verify_ct)      (i = 0..S-1; a tree's depth)
      draft acceptance rate = sum(correct) / sum(proposed)
  SGLang's own per-request figure, completion_tokens / verify_ct (`spec_accept_length`), also counts the first
  token, which the prefill makes; it is kept as `sglang_accept_length`. Not used for the table, because they are
  averages since the server started: /server_info's `internal_states[0].avg_spec_accept_length` (which also lags: the
  scheduler folds its counts into that total only every `decode_log_interval` decode steps; recorded per pass as
  `server_avg_accept_length_since_start`), the `accept len: X` log line (per log interval) and /metrics' gauge
  `sglang:spec_accept_length`. /metrics' counter `sglang:spec_verify_calls_total` (the spec_verify_ct of finished
  requests, observability/metrics_collector.py) is differenced around each pass as a cross-check: it must equal the
  pass's sum(spec_verify_ct), as nothing else runs on the server meanwhile.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from common.logs import get_logger
from common.server import vllm_command

log = get_logger("bench")


@dataclass(frozen=True)
class Draft:
    """How one speculating server drafts: a chain of `k` tokens, or (SGLang) a tree `topk` wide, `k` deep, of which
    `num_draft_tokens` (root included) are verified per step."""
    k: int                                  # draft steps: the deepest position that can be accepted
    topk: int = 1
    num_draft_tokens: int | None = None     # SGLang's M; None = k + 1 (a chain)

    def __post_init__(self) -> None:
        if self.k < 1 or self.topk < 1:
            raise ValueError(f"a draft needs num_steps >= 1 and eagle_topk >= 1, got {self}")
        m = self.num_draft_tokens
        if self.topk == 1 and m not in (None, self.k + 1):
            raise ValueError(f"with eagle_topk 1 SGLang verifies num_steps + 1 = {self.k + 1} tokens (it resets "
                             f"num_draft_tokens {m} to that): give {self.k + 1} or leave it out")
        if m is not None and not 2 <= m <= self.topk * self.k + 1:
            raise ValueError(f"num_draft_tokens {m} must be in [2, eagle_topk * num_steps + 1 = "
                             f"{self.topk * self.k + 1}]")

    @property
    def chain(self) -> bool:
        return self.topk == 1

    @property
    def tokens(self) -> int:
        return self.num_draft_tokens or self.k + 1

    @property
    def name(self) -> str:
        """Server name: eagle3-k3 (a chain, as before), eagle3-steps5-topk4-tokens8 (a tree)."""
        return f"eagle3-k{self.k}" if self.chain else f"eagle3-steps{self.k}-topk{self.topk}-tokens{self.tokens}"


def draft_label(name: str) -> str:
    """The table's label of a speculating server: "3" for eagle3-k3, "steps5-topk4-tokens8" for a tree."""
    return name[len("eagle3-k"):] if re.fullmatch(r"eagle3-k\d+", name) else name.removeprefix("eagle3-")


def sglang_trees(value: Any) -> list[Draft]:
    """`bench.sglang_tree`: None, one {num_steps, eagle_topk, num_draft_tokens} mapping, or a list of them."""
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for t in items:
        if not isinstance(t, dict) or set(t) - {"num_steps", "eagle_topk", "num_draft_tokens"} or "num_steps" not in t:
            raise ValueError(f"bench.sglang_tree entries are {{num_steps, eagle_topk, num_draft_tokens}}, got {t}")
        out.append(Draft(int(t["num_steps"]), int(t.get("eagle_topk", 1)),
                         None if t.get("num_draft_tokens") is None else int(t["num_draft_tokens"])))
    return out


# ---------------------------------------------------------------- Prometheus text
def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition -> {(sample name, sorted labels): value}. prometheus_client's parser when
    installed (vLLM and SGLang depend on it), else a small one for the `name{k="v",...} value` lines."""
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


def get_metrics(url: str) -> str:
    resp = httpx.get(url.rstrip("/") + "/metrics", timeout=30.0)
    resp.raise_for_status()
    return resp.text


# ---------------------------------------------------------------- vLLM
SPEC_COUNTERS = {  # Prometheus sample names of vLLM's (v1) speculative-decoding counters
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted": "vllm:spec_decode_num_accepted_tokens_total",
}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"


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


class VLLM:
    name, label, health_path = "vllm", "vLLM", "/health"
    shares_gpu = True            # servers may start together, each with its --gpu-memory-utilization share
    returns_token_ids = True     # completion token ids on each choice (return_token_ids)
    request_fields: dict[str, Any] = {}
    parse = None                 # stage 1's parse_response

    @staticmethod
    def command(cfg: Any, draft: Draft | None, port: int, share: float | None, gpu: bool | None) -> list[str]:
        if draft is not None and not draft.chain:
            raise ValueError("vLLM drafts chains only (bench.sglang_tree is SGLang's)")
        extra = list(cfg.extra_args)
        if draft is not None:
            spec = {"method": "eagle3", "model": str(Path(cfg.draft).resolve()), "num_speculative_tokens": draft.k}
            extra += ["--speculative-config", json.dumps(spec)]
        return vllm_command(cfg.target, cfg.served_name, port, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                            trust_remote_code=cfg.trust_remote_code, extra_args=extra, gpu=gpu,
                            gpu_memory_utilization=share)

    @staticmethod
    def snapshot(url: str) -> tuple[dict[str, Any], str]:
        """(spec_counters of the server's /metrics, the raw text)."""
        text = get_metrics(url)
        return spec_counters(parse_metrics(text)), text

    @staticmethod
    def acceptance(before: dict[str, Any], after: dict[str, Any], metas: list[dict | None], k: int
                   ) -> dict[str, Any]:
        return acceptance_from_counters(before, after, k)


# ---------------------------------------------------------------- SGLang
SGLANG_VERIFY_CALLS = "sglang:spec_verify_calls_total"   # counter, tokenizer process, with --enable-metrics
SGLANG_SPEC_CAP = 48    # running requests of a speculating server without --max-running-requests


def sglang_command(cfg: Any, draft: Draft | None, port: int, share: float | None, host: str = "127.0.0.1"
                   ) -> list[str]:
    """`python -m sglang.launch_server ...` (module docstring); `share` = --mem-fraction-static."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", cfg.target, "--served-model-name",
           cfg.served_name, "--host", host, "--port", str(port), "--dtype", cfg.dtype, "--enable-metrics"]
    if cfg.max_model_len:
        cmd += ["--context-length", str(cfg.max_model_len)]
    if share:
        cmd += ["--mem-fraction-static", f"{share:.4g}"]
    if cfg.trust_remote_code:
        cmd.append("--trust-remote-code")
    if draft is not None:
        cmd += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(Path(cfg.draft).resolve()),
                "--speculative-num-steps", str(draft.k), "--speculative-eagle-topk", str(draft.topk),
                "--speculative-num-draft-tokens", str(draft.tokens)]
        most = max(int(c) for c in cfg.concurrency)
        if most > SGLANG_SPEC_CAP and "--max-running-requests" not in cfg.extra_args:
            cmd += ["--max-running-requests", str(most)]
    return cmd + [str(a) for a in cfg.extra_args]


def sglang_parse(data: Any):
    """stage 1's parse_response, plus the choice's `meta_info` (SGLang, `return_meta_info: true`) on the message."""
    from stage1_sample.client import parse_response

    result = parse_response(data)
    meta = data["choices"][0].get("meta_info") if isinstance(data.get("choices"), list) else None
    result.message["meta_info"] = meta if isinstance(meta, dict) else None
    return result


def sglang_acceptance(metas: list[dict | None], k: int) -> dict[str, Any]:
    """Acceptance of one pass from its requests' meta_info (module docstring); ValueError if a request of a
    speculating server has no counters or they are inconsistent (0 <= correct <= k * verify_ct, histogram sums)."""
    verify = correct = proposed = completion = 0
    hist: list[int] = []
    for i, meta in enumerate(metas):
        if not meta or "spec_verify_ct" not in meta:
            if meta and meta.get("completion_tokens", 0) <= 1:
                continue   # one token: made by the prefill, no verify step (SGLang then omits the counters)
            raise ValueError(f"request {i}: no speculative counters in SGLang's meta_info ({meta}); is the server "
                             "speculating, and was return_meta_info sent?")
        v, c = int(meta["spec_verify_ct"]), int(meta["spec_num_correct_drafts"])
        h = [int(x) for x in meta.get("spec_correct_drafts_histogram") or []]
        if not 0 <= c <= k * v or (h and (sum(h) != v or sum(j * n for j, n in enumerate(h)) != c)):
            raise ValueError(f"request {i}: inconsistent SGLang counters: verify_ct {v}, correct drafts {c}, "
                             f"histogram {h}, num_steps {k}")
        verify, correct = verify + v, correct + c
        proposed += int(meta.get("spec_num_proposed_drafts", 0))
        completion += int(meta.get("completion_tokens", 0))
        hist += [0] * (len(h) - len(hist))
        for j, n in enumerate(h):
            hist[j] += n
    return {"drafts": verify, "draft_tokens": proposed, "accepted": correct,
            "acceptance_length": 1.0 + correct / verify if verify else None,
            "per_position": [sum(hist[i + 1:]) / verify for i in range(k)] if verify else [],
            "draft_acceptance_rate": correct / proposed if proposed else None,
            "sglang_accept_length": completion / verify if verify else None}


class SGLang:
    name, label, health_path = "sglang", "SGLang", "/health"
    shares_gpu = False           # one server at a time (module docstring)
    returns_token_ids = False    # outputs are compared as text
    request_fields = {"return_meta_info": True}
    parse = staticmethod(sglang_parse)

    @staticmethod
    def command(cfg: Any, draft: Draft | None, port: int, share: float | None, gpu: bool | None) -> list[str]:
        return sglang_command(cfg, draft, port, share)

    @staticmethod
    def snapshot(url: str) -> tuple[dict[str, Any], str]:
        """(/metrics' verify-call counter and /server_info's running average, the raw /metrics text)."""
        text = get_metrics(url)
        samples = parse_metrics(text)
        state: dict[str, Any] = {"verify_calls": sum(v for (n, _), v in samples.items() if n == SGLANG_VERIFY_CALLS)}
        try:
            info = httpx.get(url.rstrip("/") + "/server_info", timeout=30.0).json()
            state["avg_accept_length"] = server_avg_accept_length(info)
        except (httpx.HTTPError, ValueError):
            state["avg_accept_length"] = None
        return state, text

    @staticmethod
    def acceptance(before: dict[str, Any], after: dict[str, Any], metas: list[dict | None], k: int
                   ) -> dict[str, Any]:
        out = sglang_acceptance(metas, k)
        counted = after["verify_calls"] - before["verify_calls"]
        out["metrics_verify_calls"] = int(counted)
        if int(counted) != out["drafts"]:
            log.warning(f"SGLang's /metrics counted {counted:.0f} verify calls in the pass, its requests' meta_info "
                        f"{out['drafts']}: the acceptance comes from the meta_info")
        out["server_avg_accept_length_since_start"] = after.get("avg_accept_length")
        return out


def server_avg_accept_length(info: dict[str, Any]) -> float | None:
    """/server_info's internal_states[0].avg_spec_accept_length (a running average since start; None before any
    verify step was logged)."""
    states = info.get("internal_states") or [{}]
    value = states[0].get("avg_spec_accept_length") if isinstance(states[0], dict) else None
    return None if value is None else float(value)


BENCH_ENGINES = {"vllm": VLLM, "sglang": SGLang}
