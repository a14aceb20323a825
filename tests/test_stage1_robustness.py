"""Stage 1 against a misbehaving server (tests/fixtures/fake_openai.py, a real HTTP server on 127.0.0.1): a malformed
200 or a trickling answer fails one request, and at worst one conversation, never the run; the vLLM that stage 1
launches gets the target preset's tool / reasoning parsers, and where the preset has no tool parser conversations
with tools are skipped with the reason instead of failing on HTTP 400; an empty input fails loudly unless allowed; a
smaller sample.num_prompts cannot resume a larger run; secret server flags never reach config.yaml or the log."""
from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from common.server import parses_tool_calls, redact_args, redact_env, server_command
from common.target import TargetSpec
from stage1_sample.__main__ import run_stage1
from stage1_sample.client import ChatClient, MalformedResponse, parse_response
from tests.fixtures.fake_openai import FakeOpenAI, fake_vllm_env

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}}]


def _chat(url: str, *, timeout: float = 5.0, max_retries: int = 1):
    """One turn through the real client; (result, retries, seconds)."""
    async def go():
        async with ChatClient([url], "m", timeout=timeout, max_retries=max_retries, backoff_base=0.01,
                              backoff_max=0.05) as client:
            t0 = time.monotonic()
            result = await client.chat([{"role": "user", "content": "hi"}], max_tokens=4)
            return result, client.num_retries, time.monotonic() - t0
    return asyncio.run(go())


def _input(path: Path, contents: list[str], tools_at: tuple[int, ...] = ()) -> Path:
    """A JSONL input: conversation c<i> asks contents[i] (and carries TOOLS when i is in ``tools_at``)."""
    rows = [{"id": f"c{i}", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "old"}],
             **({"tools": TOOLS} if i in tools_at else {})} for i, text in enumerate(contents)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _resolved(input_file: Path, out_dir: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[
            f"sample.input={input_file}", f"sample.output={out_dir}", "sample.max_tokens=8",
            "sample.concurrency=2", "sample.advanced.request_timeout=1", "sample.advanced.max_retries=1", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------- item 3: a malformed 200 is a bad answer

@pytest.mark.parametrize("bad", ["not-json", "message-string"])
def test_a_malformed_200_is_retried_like_a_5xx(bad):
    with FakeOpenAI([bad, "ok"]) as fake:
        result, retries, _ = _chat(fake.url)
    assert retries == 1 and len(fake.requests) == 2
    assert result.message["content"] == "fake answer 2" and result.message["completion_token_ids"] == [12, 11, 2]


@pytest.mark.parametrize("data,field", [
    ({"choices": [{"message": "text"}]}, "message"),
    ({"choices": []}, "message"),
    ([1, 2], "message"),
    ({"choices": [{"message": {"content": 7}}]}, "message.content"),
    ({"choices": [{"message": {"content": "a", "tool_calls": "f()"}}]}, "message.tool_calls"),
    ({"choices": [{"message": {"content": "a"}, "token_ids": "12"}]}, "token_ids"),
    ({"prompt_token_ids": [1, "x"], "choices": [{"message": {"content": "a"}}]}, "prompt_token_ids"),
    ({"choices": [{"message": {"content": "a"}}], "usage": {"completion_tokens": "3"}}, "usage.completion_tokens"),
])
def test_parse_response_refuses_every_field_of_the_wrong_type(data, field):
    with pytest.raises(MalformedResponse, match=field):
        parse_response(data)


def test_one_malformed_or_late_conversation_fails_alone_and_the_run_goes_on(tmp_path):
    """Each bad conversation is recorded as failed, with the reason, once its retries are spent; the rest is written."""
    contents = ["good one", "[[not-json]] q", "[[message-string]] q", "[[trickle]] q", "good two"]
    with FakeOpenAI(trickle_delay=0.05) as fake:
        manifest = run_stage1(_resolved(_input(tmp_path / "in.jsonl", contents), tmp_path / "out",
                                        "sample.server.launch=false", f"sample.server.urls=[{fake.url}]"))
    assert manifest["accounting"] == {"input": 5, "written": 2, "skipped": 0, "failed": 3} and manifest["num_rows"] == 2
    errors = {f["id"]: f["error"] for f in _lines(tmp_path / "out" / "failed.jsonl")}
    assert sorted(errors) == ["c1", "c2", "c3"] and all("gave up after 2 attempts" in e for e in errors.values())
    assert "not JSON" in errors["c1"] and "message" in errors["c2"] and "request deadline" in errors["c3"]


# ------------------------------------------------------------------------- item 4: one deadline for the whole request

def test_a_trickling_answer_hits_the_request_deadline_and_is_retried():
    """Every byte arrives well within httpx's per-read timeout; the answer as a whole (> 10 s) does not, in 1 s."""
    with FakeOpenAI(["trickle", "ok"], trickle_delay=0.05) as fake:
        result, retries, seconds = _chat(fake.url, timeout=1.0)
    assert retries == 1 and result.message["content"] == "fake answer 2"
    assert seconds < 5, f"the trickled request held the client {seconds:.1f} s against a 1 s deadline"


# ------------------------------------------------------------------------- item 9: tools and the launched vLLM

@pytest.mark.parametrize("preset,tool_flags,reasoning_flags", [
    ("smollm2-135m", [], []),
    ("llama-3.1-8b-instruct", ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"], []),
    ("qwen3-8b", ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], ["--reasoning-parser", "qwen3"]),
    ("gpt-oss-20b", ["--enable-auto-tool-choice", "--tool-call-parser", "openai"], []),
    ("gpt-oss-120b", ["--enable-auto-tool-choice", "--tool-call-parser", "openai"], []),
])
def test_the_launched_vllm_gets_the_presets_parsers(preset, tool_flags, reasoning_flags):
    target = TargetSpec.from_mapping(yaml.safe_load((CONF / "target" / f"{preset}.yaml").read_text()))
    cmd = server_command("vllm", target.path, target.served_name, 8001, gpu=False,
                         tool_call_parser=target.tool_call_parser, reasoning_parser=target.reasoning_parser)
    expected = tool_flags + reasoning_flags  # at the end: no extra_args here
    head = cmd[:len(cmd) - len(expected)]
    assert cmd[len(head):] == expected
    assert not {"--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser"} & set(head)
    assert parses_tool_calls(cmd) == bool(tool_flags)
    # transformers serve has no such flags: it renders `tools` with the chat template itself
    assert not parses_tool_calls(server_command("transformers", target.path, target.served_name, 8001, gpu=False,
                                                tool_call_parser=target.tool_call_parser))


@pytest.mark.parametrize("tool_call_parser", ["hermes", None])
def test_tool_conversations_against_the_launched_server(tmp_path, caplog, tool_call_parser):
    """Stage 1 launches the fake as its vLLM (launcher, health check, stop): with the preset's tool parser the tool
    conversation is regenerated; without one it is skipped with the reason, not failed on the 400 vLLM would send.
    The launch also carries secret flags: neither config.yaml nor the logged command line shows their values."""
    out = tmp_path / "out"
    resolved = _resolved(_input(tmp_path / "in.jsonl", ["plain", "with tools"], tools_at=(1,)), out,
                         "sample.advanced.server.startup_timeout=60",
                         f"target.tool_call_parser={tool_call_parser or 'null'}")
    server = resolved["sample"]["server"]
    server["extra_args"] = ["--api-key", "sekrit-1", "--hf-token=sekrit-2", "--enforce-eager"]
    server["env"] = {**fake_vllm_env(tmp_path / "fake"), "HF_TOKEN": "sekrit-3"}
    caplog.set_level(logging.INFO, logger="eagle3")
    manifest = run_stage1(resolved)

    assert f"tool parser: {tool_call_parser}" in (out / "server.log").read_text()  # the flags reached the server
    skipped = _lines(out / "skipped.jsonl")
    assert not (out / "failed.jsonl").read_text()
    if tool_call_parser:
        assert manifest["accounting"] == {"input": 2, "written": 2, "skipped": 0, "failed": 0}
        rows = {r["id"]: r for r in _lines(out / "shard-00000.jsonl")}
        assert rows["c1"]["tools"] == TOOLS and rows["c1"]["messages"][-1]["content"].startswith("fake answer")
    else:
        assert manifest["accounting"] == {"input": 2, "written": 1, "skipped": 1, "failed": 0}
        assert [s["id"] for s in skipped] == ["c1"] and "target.tool_call_parser" in skipped[0]["reason"]

    saved = (out / "config.yaml").read_text()
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("started vLLM")]
    assert len(started) == 1 and "--api-key <redacted>" in started[0] and "--hf-token=<redacted>" in started[0]
    assert "--enforce-eager" in started[0] and "sekrit" not in started[0] + caplog.text
    assert "sekrit" not in saved
    assert yaml.safe_load(saved)["sample"]["server"]["extra_args"] == \
        ["--api-key", "<redacted>", "--hf-token=<redacted>", "--enforce-eager"]


# ------------------------------------------------------------------------- item 13: an empty input

def test_an_empty_input_fails_loudly_unless_allowed(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    base = [sys.executable, "-m", "stage1_sample", f"sample.input={tmp_path / 'empty.jsonl'}",
            f"sample.output={tmp_path / 'out'}", "sample.server.launch=false",
            "sample.server.urls=[http://127.0.0.1:9]"]  # never contacted: there is nothing to send
    refused = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "has no records" in refused.stderr + refused.stdout
    assert not (tmp_path / "out" / "manifest.json").exists()

    allowed = subprocess.run(base + ["sample.allow_empty=true"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_rows"] == 0 and manifest["server"]["launched"] is False
    assert manifest["accounting"] == {"input": 0, "written": 0, "skipped": 0, "failed": 0}


# ------------------------------------------------------------------------- item 14: num_prompts and resume

def test_resume_refuses_fewer_prompts_and_extends_with_more(tmp_path):
    input_file = _input(tmp_path / "in.jsonl", [f"question {i}" for i in range(6)])
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        def run(num_prompts: str) -> dict:
            return run_stage1(_resolved(input_file, out, f"sample.num_prompts={num_prompts}",
                                        "sample.server.launch=false", f"sample.server.urls=[{fake.url}]"))

        assert run("4")["num_rows"] == 4
        with pytest.raises(ValueError, match=r"sample.num_prompts: 4 -> 2"):
            run("2")  # would leave 4 rows under an accounting of 2
        grown = run("6")
        assert grown["num_rows"] == 6 and grown["accounting"]["written"] == 6
        assert len(fake.requests) == 6  # the first 4 were resumed, not asked again
        assert run("null")["num_rows"] == 6  # every record: still a superset of the shards
        with pytest.raises(ValueError, match=r"sample.num_prompts: None -> 5"):
            run("5")
    assert json.loads((out / "manifest.json").read_text())["num_rows"] == 6


# ------------------------------------------------------------------------- item 16: secrets

def test_redaction_of_secret_flags_and_environment():
    args = ["--api-key", "s1", "--hf-token=s2", "--max-num-batched-tokens", "8192", "--ssl-keyfile", "/k.pem",
            "--tensor-parallel-size", 2, "--api-key", "--enforce-eager"]
    assert redact_args(args) == ["--api-key", "<redacted>", "--hf-token=<redacted>", "--max-num-batched-tokens",
                                 "8192", "--ssl-keyfile", "/k.pem", "--tensor-parallel-size", 2, "--api-key",
                                 "--enforce-eager"]
    assert redact_env({"VLLM_API_KEY": "s", "HF_TOKEN": "s", "VLLM_CPU_KVCACHE_SPACE": "2"}) == \
        {"VLLM_API_KEY": "<redacted>", "HF_TOKEN": "<redacted>", "VLLM_CPU_KVCACHE_SPACE": "2"}


def test_every_saved_config_redacts_server_secrets():
    """`config.yaml` of any command (stage 1, serving benchmark, ...) never holds a key given as a flag or env."""
    import yaml

    from common.entry import config_yaml

    resolved = {"bench": {"extra_args": ["--api-key", "k1", "--max-num-seqs", "8"], "env": {"HF_TOKEN": "k2"}},
                "sample": {"server": {"extra_args": ["--api-key=k3"], "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}}}}
    text = config_yaml(resolved)
    assert not {"k1", "k2", "k3"} & set(text.replace("=", " ").split())
    saved = yaml.safe_load(text)
    assert saved["bench"]["extra_args"] == ["--api-key", "<redacted>", "--max-num-seqs", "8"]
    assert saved["sample"]["server"]["env"] == {"VLLM_CPU_KVCACHE_SPACE": "2"}
