"""Serving benchmark: /metrics parsing and acceptance arithmetic, and (slow) one real bench-serve run on the vLLM CPU
server with an exported random SmolLM2-shaped draft."""
from __future__ import annotations

import json

import pytest

from evaluation.engines import _parse_metrics_plain, acceptance_from_counters, parse_metrics, spec_counters
from evaluation.serve import (ServeBenchConfig, plain_args as _plain_args, run, serve_summary as summarize,
                              serve_table as format_table)

# vLLM 0.32's exposition of the counters (prometheus_client: *_total and *_created samples, engine/model labels)
METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 40.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7e+09
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 120.0
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 30.0
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 20.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 8.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 2.0
"""


def test_parse_metrics_and_acceptance():
    samples = parse_metrics(METRICS)
    assert samples == _parse_metrics_plain(METRICS)      # prometheus_client's parser == the fallback
    c = spec_counters(samples)
    assert (c["drafts"], c["draft_tokens"], c["accepted"], c["per_pos"]) == (40, 120, 30, [20, 8, 2])
    zero = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": []}
    a = acceptance_from_counters(zero, c, k=3)
    assert a["acceptance_length"] == pytest.approx(1 + 30 / 40)
    assert a["per_position"] == pytest.approx([0.5, 0.2, 0.05])
    assert a["draft_acceptance_rate"] == pytest.approx(0.25)
    later = {**c, "drafts": 50, "accepted": 36, "draft_tokens": 150, "per_pos": [24, 10, 2]}
    assert acceptance_from_counters(c, later, k=3)["acceptance_length"] == pytest.approx(1 + 6 / 10)
    with pytest.raises(ValueError, match="inconsistent"):
        acceptance_from_counters(zero, {**c, "accepted": 121}, k=3)   # more than k per draft
    with pytest.raises(ValueError, match="inconsistent"):
        acceptance_from_counters(zero, {**c, "per_pos": [1, 1, 1]}, k=3)


def test_summary_table_and_config(tmp_path):
    spec = {"drafts": 10, "accepted": 5, "acceptance_length": 1.5, "per_position": [0.4, 0.1, 0.0],
            "draft_acceptance_rate": 5 / 30}
    results = {"baseline": {"passes": {"4": {"output_tokens_per_s": 100.0, "tpot_ms": 10.0,
                                             "completion_ids": [[1, 2], [3]]}}},
               "eagle3-k3": {"passes": {"4": {"output_tokens_per_s": 80.0, "tpot_ms": 12.5,
                                              "completion_ids": [[1, 2], [4]], "spec": spec}}}}
    s = summarize(results)["4"]
    assert s["speedup"] == 0.8 and s["identical_outputs"] == "1/2" and s["acceptance_length"] == 1.5
    assert s["best_k"] == 3 and s["baseline_tpot_ms"] == 10.0 and s["eagle3_tpot_ms"] == 12.5
    assert "| 4 | 100.0 | 80.0 | 0.8 | 3 | 1.500 | 0.400 / 0.100 / 0.000 | 10.0 -> 12.5 | 1/2 |" in format_table(
        summarize(results))
    with pytest.raises(ValueError, match="export folder"):
        ServeBenchConfig(draft=str(tmp_path))
    with pytest.raises(ValueError):
        ServeBenchConfig(draft=str(tmp_path), concurrency=[])


def test_best_k_per_concurrency_is_the_fastest():
    """With several k served, each concurrency's row takes the k with the highest output tokens/s (not the
    longest acceptance), and the second table lists every k's speedup."""
    def spec(acc):
        return {"drafts": 10, "accepted": 1, "acceptance_length": acc, "per_position": [0.1],
                "draft_acceptance_rate": 0.1}

    def passes(rates, acc):
        return {"passes": {c: {"output_tokens_per_s": r, "tpot_ms": 1000 / r, "completion_ids": [[1]],
                               "spec": spec(acc)} for c, r in rates.items()}}

    results = {"baseline": {"passes": {c: {"output_tokens_per_s": 100.0, "tpot_ms": 10.0, "completion_ids": [[1]]}
                                       for c in ("1", "64")}},
               "eagle3-k1": passes({"1": 130.0, "64": 120.0}, 1.6),
               "eagle3-k3": passes({"1": 160.0, "64": 110.0}, 2.1),
               "eagle3-k5": passes({"1": 150.0, "64": 90.0}, 2.3)}
    summary = summarize(results)
    assert summary["1"]["best_k"] == 3 and summary["1"]["speedup"] == 1.6
    assert summary["64"]["best_k"] == 1 and summary["64"]["speedup"] == 1.2
    assert set(summary["1"]["by_k"]) == {"1", "3", "5"} and summary["64"]["by_k"]["5"]["speedup"] == 0.9
    table = format_table(summary)
    assert "| 64 | 1.2 (1.600) | 1.1 (2.100) | 0.9 (2.300) |" in table


def test_servers_started_together_split_the_gpu(tmp_path):
    """On a GPU every server (baseline + one per k) is started at once with an equal share of the card; on a CPU
    they start one at a time with no GPU flag; a single k given as an int is a one-element sweep."""
    from evaluation.serve import server_commands

    draft = tmp_path / "export"
    draft.mkdir()
    (draft / "config.json").write_text("{}")
    cfg = ServeBenchConfig(draft=str(draft), num_speculative_tokens=[1, 2, 3], port=9000)
    gpu = server_commands(cfg, together=True, gpu=True)
    assert [(name, k, port) for name, k, port, _ in gpu] == [("baseline", None, 9000), ("eagle3-k1", 1, 9001),
                                                             ("eagle3-k2", 2, 9002), ("eagle3-k3", 3, 9003)]
    for name, k, _, cmd in gpu:
        assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.225"
        assert ("--speculative-config" in cmd) == (k is not None)
        if k is not None:
            assert json.loads(cmd[cmd.index("--speculative-config") + 1])["num_speculative_tokens"] == k
    cpu = server_commands(cfg, together=False, gpu=False)
    assert not any("--gpu-memory-utilization" in cmd for *_, cmd in cpu)
    assert ServeBenchConfig(draft=str(draft), num_speculative_tokens=4).num_speculative_tokens == [4]
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        ServeBenchConfig(draft=str(draft), num_speculative_tokens=[0])


@pytest.mark.slow
def test_bench_serve_on_the_real_vllm_cpu_server(smollm2_dir, random_smollm2_export, tmp_path):
    """One speculating vLLM CPU server (~2-3 min start-up), 4 prompts x 16 tokens at concurrency 1 and 2: the
    counters parse and agree, and the table has a row per concurrency."""
    out = tmp_path / "bench"
    cfg = _plain_args(["--plain", "--target", str(smollm2_dir), "--served-name", "smollm2-135m",
                       "--draft", str(random_smollm2_export), "--output", str(out), "--num-prompts", "4",
                       "--max-tokens", "16", "--concurrency", "1", "2", "--baseline", "false",
                       "--num-speculative-tokens", "3", "--warmup-requests", "1"])
    report = run(cfg)
    saved = json.loads((out / "bench_serve.json").read_text())
    assert saved["complete"] is True
    p = saved["results"]["eagle3-k3"]["passes"]["2"]
    assert p["requests"] == 4 and 4 <= p["output_tokens"] <= 64 and p["output_tokens_per_s"] > 0
    spec = p["spec"]
    assert spec["drafts"] > 0 and 0 <= spec["accepted"] <= 3 * spec["drafts"]
    assert spec["drafts"] <= spec["draft_tokens"] <= 3 * spec["drafts"]
    assert len(spec["per_position"]) == 3 and 1.0 <= spec["acceptance_length"] <= 4.0
    assert spec["acceptance_length"] < 1.5           # a random draft accepts (almost) nothing
    text = (out / "metrics-eagle3-k3.txt").read_text()  # the real exposition: both parsers agree on it
    c = spec_counters(parse_metrics(text))
    assert c == spec_counters(_parse_metrics_plain(text))
    assert c["drafts"] >= spec["drafts"] and len(c["per_pos"]) == 3
    assert report["summary"]["2"]["acceptance_length"] == spec["acceptance_length"]
    # the per-concurrency table: one row per concurrency, each with its k, acceptance and TPOT
    table = (out / "bench_serve.md").read_text().splitlines()
    rows = [line for line in table if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(" | 3 | " in row for row in rows)
    assert all(saved["results"]["eagle3-k3"]["passes"][c]["tpot_ms"] > 0 for c in ("1", "2"))
