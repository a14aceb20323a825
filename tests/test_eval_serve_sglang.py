"""`bench.engine=sglang`: SGLang's server command lines (chains: num_draft_tokens = k + 1; trees), and the acceptance
read from SGLang's own counters in recorded answers (tests/fixtures/sglang_answers.py, written from SGLang 0.5.15's
source), also through a fake SGLang server over HTTP."""
from __future__ import annotations

import json

import pytest

from evaluation.engines import (SGLang, draft_label, parse_metrics, server_avg_accept_length, sglang_acceptance,
                                sglang_parse)
from evaluation.serve import ServeBenchConfig, bench_server, serve_summary, serve_table, server_commands
from tests.fixtures import sglang_answers as rec


@pytest.fixture
def draft(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_sglang_chain_command_lines(draft):
    """One server per k, one at a time (no GPU share unless asked): chain drafting is num_steps k, eagle_topk 1 and
    num_draft_tokens k + 1 (SGLang counts the root token); the baseline has no speculative flags."""
    cfg = ServeBenchConfig(engine="sglang", target="/m/SmolLM2", served_name="smol", draft=str(draft),
                           num_speculative_tokens=[1, 3], port=9000, max_model_len=2048, extra_args=["--x", "1"])
    cmds = server_commands(cfg, together=False, gpu=True)
    assert [(name, k, port) for name, k, port, _ in cmds] == [("baseline", None, 9000), ("eagle3-k1", 1, 9001),
                                                              ("eagle3-k3", 3, 9002)]
    for name, k, port, cmd in cmds:
        assert cmd[1:3] == ["-m", "sglang.launch_server"] and cmd[-2:] == ["--x", "1"]
        assert (flag(cmd, "--model-path"), flag(cmd, "--served-model-name"), flag(cmd, "--host"),
                flag(cmd, "--port"), flag(cmd, "--dtype"), flag(cmd, "--context-length")) == (
            "/m/SmolLM2", "smol", "127.0.0.1", str(port), "bfloat16", "2048")
        assert "--enable-metrics" in cmd and "--mem-fraction-static" not in cmd
        assert "--max-running-requests" not in cmd   # concurrency [1, 4] is under the speculative cap of 48
        if k is None:
            assert not any(a.startswith("--speculative") for a in cmd)
        else:
            assert (flag(cmd, "--speculative-algorithm"), flag(cmd, "--speculative-draft-model-path"),
                    flag(cmd, "--speculative-num-steps"), flag(cmd, "--speculative-eagle-topk"),
                    flag(cmd, "--speculative-num-draft-tokens")) == ("EAGLE3", str(draft.resolve()), str(k), "1",
                                                                      str(k + 1))
    # an explicit GPU share is SGLang's --mem-fraction-static; a concurrency above 48 lifts the speculative cap
    cfg = ServeBenchConfig(engine="sglang", draft=str(draft), gpu_memory_utilization=0.4, concurrency=[1, 64])
    base, spec = server_commands(cfg, together=False, gpu=True)
    assert flag(base[3], "--mem-fraction-static") == "0.4" == flag(spec[3], "--mem-fraction-static")
    assert "--max-running-requests" not in base[3] and flag(spec[3], "--max-running-requests") == "64"


def test_sglang_tree_command_lines_and_checks(draft):
    """`bench.sglang_tree` adds one server per tree beside the chains (or alone with num_speculative_tokens []);
    its flags are passed as given. Settings SGLang would change or that are not SGLang's are refused."""
    tree = {"num_steps": 5, "eagle_topk": 4, "num_draft_tokens": 8}
    cfg = ServeBenchConfig(engine="sglang", draft=str(draft), num_speculative_tokens=[3], sglang_tree=tree,
                           baseline=False)
    (n1, k1, _, chain), (n2, k2, _, cmd) = server_commands(cfg, together=False)
    assert (n1, k1, n2, k2) == ("eagle3-k3", 3, "eagle3-steps5-topk4-tokens8", 5)
    assert flag(chain, "--speculative-num-draft-tokens") == "4"
    assert (flag(cmd, "--speculative-num-steps"), flag(cmd, "--speculative-eagle-topk"),
            flag(cmd, "--speculative-num-draft-tokens")) == ("5", "4", "8")
    assert draft_label(n2) == "steps5-topk4-tokens8" and draft_label(n1) == "3"
    trees = [tree, {"num_steps": 3, "eagle_topk": 2, "num_draft_tokens": 6}]
    only = ServeBenchConfig(engine="sglang", draft=str(draft), num_speculative_tokens=[], sglang_tree=trees)
    assert [n for n, *_ in server_commands(only, together=False)] == [
        "baseline", "eagle3-steps5-topk4-tokens8", "eagle3-steps3-topk2-tokens6"]
    with pytest.raises(ValueError, match="resets"):     # topk 1: SGLang would verify num_steps + 1 tokens anyway
        ServeBenchConfig(engine="sglang", draft=str(draft), sglang_tree={"num_steps": 3, "num_draft_tokens": 6})
    with pytest.raises(ValueError, match="num_draft_tokens"):
        ServeBenchConfig(engine="sglang", draft=str(draft), sglang_tree={"num_steps": 2, "eagle_topk": 2,
                                                                          "num_draft_tokens": 9})
    with pytest.raises(ValueError, match="sglang_tree"):
        ServeBenchConfig(draft=str(draft), sglang_tree=tree)                     # vLLM
    with pytest.raises(ValueError, match="one at a time"):
        ServeBenchConfig(engine="sglang", draft=str(draft), start_together=True)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        ServeBenchConfig(engine="sglang", draft=str(draft), num_speculative_tokens=[])
    with pytest.raises(ValueError, match="bench.engine"):
        ServeBenchConfig(engine="tgi", draft=str(draft))


def test_sglang_acceptance_from_recorded_answers():
    """Per-request counters of one pass: acceptance length 1 + correct / verify_ct (vLLM's definition), positions
    from the histograms; SGLang's own completion_tokens / verify_ct beside it; the one-token request has none."""
    parsed = sglang_parse(rec.CHAT_ANSWER)
    assert parsed.message["content"].startswith("Answer 0") and parsed.num_completion_tokens == 256
    assert parsed.message["meta_info"]["spec_verify_ct"] == 100
    a = sglang_acceptance(rec.METAS, k=3)
    assert (a["drafts"], a["accepted"], a["draft_tokens"]) == (240, 356, 720)
    assert a["acceptance_length"] == pytest.approx(1 + 356 / 240)
    assert a["per_position"] == pytest.approx([181 / 240, 118 / 240, 57 / 240])
    assert sum(a["per_position"]) == pytest.approx(a["acceptance_length"] - 1)
    assert a["draft_acceptance_rate"] == pytest.approx(356 / 720)
    assert a["sglang_accept_length"] == pytest.approx((256 + 256 + 87) / 240)
    with pytest.raises(ValueError, match="inconsistent"):
        sglang_acceptance([{**rec.METAS[0], "spec_num_correct_drafts": 301}], k=3)    # > k per verify step
    with pytest.raises(ValueError, match="inconsistent"):
        sglang_acceptance([{**rec.METAS[0], "spec_correct_drafts_histogram": [100]}], k=3)
    with pytest.raises(ValueError, match="return_meta_info"):
        sglang_acceptance([None], k=3)


def test_sglang_metrics_and_server_info():
    """The cross-check counter in /metrics (multiprocess exposition) and /server_info's running average."""
    before, after = parse_metrics(rec.METRICS_BEFORE), parse_metrics(rec.METRICS_AFTER)
    name = "sglang:spec_verify_calls_total"
    assert [v for (n, _), v in after.items() if n == name] == [1052.0]
    state = lambda s: {"verify_calls": sum(v for (n, _), v in s.items() if n == name), "avg_accept_length": 2.47}
    a = SGLang.acceptance(state(before), state(after), rec.METAS, 3)
    assert a["metrics_verify_calls"] == 240 == a["drafts"]
    assert a["server_avg_accept_length_since_start"] == 2.47
    assert server_avg_accept_length(rec.SERVER_INFO) == 2.4711
    assert server_avg_accept_length({"internal_states": [{}]}) is None


def test_bench_server_against_a_fake_sglang(draft, tmp_path):
    """One pass against a fake SGLang over HTTP: requests ask for meta_info (not vLLM's token ids), outputs are
    kept as text, and the pass's acceptance is the recorded requests' (the /metrics counter agrees)."""
    cfg = ServeBenchConfig(engine="sglang", draft=str(draft), output=str(tmp_path), concurrency=[2], warmup_requests=0)
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    with rec.FakeSGLang() as fake:
        state, _ = SGLang.snapshot(fake.url)
        assert state == {"verify_calls": 812.0, "avg_accept_length": 2.4711}
        passes = bench_server(fake.url, cfg, conversations, "eagle3-k3", 3)
    assert all(r["return_meta_info"] is True and "return_token_ids" not in r for r in fake.requests)
    p = passes["2"]
    assert p["output_tokens"] == 256 + 256 + 87 + 1 and len(p["completion_texts"]) == 4
    assert "completion_ids" not in p
    assert p["spec"]["acceptance_length"] == pytest.approx(1 + 356 / 240) and p["spec"]["metrics_verify_calls"] == 240
    assert (tmp_path / "metrics-eagle3-k3.txt").read_text() == rec.METRICS_AFTER
    # the summary and table work on text outputs and tree labels
    base = {"output_tokens_per_s": 100.0, "tpot_ms": 10.0, "completion_texts": p["completion_texts"][:3] + ["x"]}
    tree = {**p, "output_tokens_per_s": p["output_tokens_per_s"] + 1}
    summary = serve_summary({"baseline": {"passes": {"2": base}}, "eagle3-k3": {"passes": passes},
                             "eagle3-steps5-topk4-tokens8": {"passes": {"2": tree}}})["2"]
    assert summary["best_k"] == "steps5-topk4-tokens8" and summary["identical_outputs"] == "3/4"
    assert list(summary["by_k"]) == ["3", "steps5-topk4-tokens8"]
    table = serve_table({"2": summary})
    assert "k=3: speedup (acceptance length)" in table and "steps5-topk4-tokens8: speedup" in table
    json.dumps(summary)
