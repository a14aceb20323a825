"""Stage 1 against a real vLLM CPU server on SmolLM2: turn-by-turn answers, token ids equal to the
tokenizer's rendering, sample.max_conversation_tokens stopping a conversation exactly where the server's own
prompt ids reach the limit, the CLI killed with -9 and resumed (no loss, no duplicates), Ctrl-C leaving no
server process behind."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stage1_sample.client import ChatClient
from stage1_sample.formats import Conversation, load_conversations
from stage1_sample.regenerate import ContextBudget, PromptTooLong, regenerate

REPO = Path(__file__).resolve().parent.parent
# two assistant turns to regenerate, and it ends on a user turn: one more answer is generated
THREE_TURNS = Conversation("t1", [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "ORIGINAL ANSWER ONE"},
    {"role": "user", "content": "Name another one."},
    {"role": "assistant", "content": "ORIGINAL ANSWER TWO"},
    {"role": "user", "content": "And a fruit?"},
])
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "seed": 0, "chat_template_kwargs": {}}


def test_turn_by_turn_regeneration_and_token_ids(vllm_server, smollm2_dir):
    from transformers import AutoTokenizer

    conv = THREE_TURNS

    async def go():
        async with ChatClient([vllm_server], "smollm2-135m", timeout=120, max_retries=2) as client:
            return await regenerate(client, conv, SAMPLING)

    record, num_tokens = asyncio.run(go())
    msgs = record["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs if m["role"] != "assistant"] == \
        [m["content"] for m in conv.messages if m["role"] != "assistant"]
    answers = [(i, m) for i, m in enumerate(msgs) if m["role"] == "assistant"]
    assert not any("ORIGINAL" in m["content"] for _, m in answers)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for i, m in answers:
        assert m["content"].strip() and m["finish_reason"] in ("stop", "length")
        # the prompt the server saw is the chat template of the history with the *regenerated* answers
        history = [{"role": h["role"], "content": h["content"]} for h in msgs[:i]]
        expected = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert m["prompt_token_ids"] == list(expected)
        ids = m["completion_token_ids"]
        assert 0 < len(ids) <= SAMPLING["max_tokens"]
        assert tok.decode(ids, skip_special_tokens=True) == m["content"]
        text_ids = ids[:-1] if ids[-1] == tok.eos_token_id else ids
        assert tok.decode(tok.encode(m["content"], add_special_tokens=False)) == m["content"]
        assert tok.decode(text_ids) == m["content"]
    assert num_tokens == sum(len(m["completion_token_ids"]) for _, m in answers)
    # turn 2 was conditioned on the regenerated turn 1 (not on the original)
    assert answers[0][1]["content"] in tok.decode(answers[1][1]["prompt_token_ids"])
    # greedy + fixed seed: the same answers again
    assert asyncio.run(go())[0] == record



POEMS = Conversation("p1", [
    {"role": "user", "content": "Write a short poem about the sea."},
    {"role": "assistant", "content": "ORIGINAL ONE"},
    {"role": "user", "content": "Now one about the sky."},
    {"role": "assistant", "content": "ORIGINAL TWO"},
])


def test_max_conversation_tokens_stops_where_the_server_prompt_reaches_it(vllm_server, smollm2_dir):
    """The budget counts the prompt as the server sees it (= vLLM's prompt_token_ids); an answer that would cross
    the limit is capped at limit - prompt + MARGIN tokens (the same greedy tokens up to there), no turn starts at or
    past the limit, and a first prompt past it is refused."""
    async def go(b):
        async with ChatClient([vllm_server], "smollm2-135m", timeout=120, max_retries=2) as client:
            return await regenerate(client, POEMS, {**SAMPLING, "max_tokens": 32}, budget=b)

    full = asyncio.run(go(None))[0]["messages"]
    first, second = full[1], full[3]
    p1, p2 = len(first["prompt_token_ids"]), len(second["prompt_token_ids"])
    renderer = ContextBudget.for_target(p2, str(smollm2_dir)).renderer
    assert len(renderer.prompt_ids(full[:1])) == p1 and len(renderer.prompt_ids(full[:3])) == p2  # as vLLM counts

    # limit = turn 2's prompt: turn 1 is answered in full, turn 2 is never sent
    budget = ContextBudget.for_target(p2, str(smollm2_dir))
    record, num_tokens = asyncio.run(go(budget))
    assert record["messages"] == full[:2] and num_tokens == len(first["completion_token_ids"]) and budget.num_cut == 1

    # a limit inside turn 1's answer: that answer is cut MARGIN tokens past it, the same tokens up to there
    assert len(first["completion_token_ids"]) > 4 + ContextBudget.MARGIN, "turn 1 too short for this test"
    budget = ContextBudget.for_target(p1 + 4, str(smollm2_dir))
    record, num_tokens = asyncio.run(go(budget))
    answer = record["messages"][-1]
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert answer["finish_reason"] == "length" and num_tokens == 4 + ContextBudget.MARGIN
    assert answer["completion_token_ids"] == first["completion_token_ids"][: 4 + ContextBudget.MARGIN]

    with pytest.raises(PromptTooLong, match="max_conversation_tokens"):
        asyncio.run(go(ContextBudget.for_target(p1, str(smollm2_dir))))

def _write_input(path: Path) -> list[str]:
    """12 good conversations (some 2-turn), 1 bad record, 1 whose prompt overflows max_model_len=4096."""
    rows = []
    for i in range(12):
        msgs = [{"role": "user", "content": f"Give me one word that rhymes with number {i}."},
                {"role": "assistant", "content": "old answer"}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "Now a different one."}, {"role": "assistant", "content": "old"}]
        rows.append({"id": f"c{i:02d}", "messages": msgs})
    rows.insert(5, {"id": "bad", "messages": [{"role": "assistant", "content": "no user here"}]})
    rows.insert(9, {"id": "huge", "messages": [{"role": "user", "content": "hello " * 6000}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["id"] for r in rows if r["id"] not in ("bad", "huge")]


def _cli(out_dir: Path, input_file: Path, *extra: str) -> list[str]:
    """Stage 1 with no conversation length (max_length=null): the huge prompt goes to the server, which refuses it."""
    return [sys.executable, "-m", "stage1_sample", f"sample.input={input_file}", f"sample.output={out_dir}",
            "sample.max_tokens=16", "sample.temperature=0", "sample.advanced.rows_per_shard=2", "sample.concurrency=2",
            "sample.advanced.max_retries=1", "max_length=null", *extra]


def _rows_on_disk(out_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in out_dir.glob("shard-*.jsonl*"))


def test_cli_kill9_then_resume_loses_and_duplicates_nothing(vllm_server, tmp_path):
    expected = _write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    cmd = _cli(out, tmp_path / "in.jsonl", "sample.server.launch=false", f"sample.server.urls=[{vllm_server}]")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while _rows_on_disk(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.kill()  # SIGKILL mid-run: no clean-up at all
    proc.wait()
    assert not (out / "manifest.json").exists()
    before = {c.id: c.to_json() for p in out.glob("shard-*.jsonl*")
              for c in load_conversations(p) if isinstance(c, Conversation)}
    assert len(before) >= 3

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = re.search(r"accounting: input (\d+) = written (\d+) \+ skipped (\d+) \+ failed (\d+) \(resumed (\d+)",
                     done.stdout)
    assert line, done.stdout
    assert [int(x) for x in line.groups()[:4]] == [14, 12, 1, 1] and int(line.group(5)) == len(before)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["accounting"] == {"input": 14, "written": 12, "skipped": 1, "failed": 1}
    after = [c for c in load_conversations(out)]
    ids = [c.id for c in after]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert all(c.to_json() == before[c.id] for c in after if c.id in before)  # earlier rows kept as written
    assert all(len(c.messages) == (4 if int(c.id[1:]) % 3 == 0 else 2) for c in after)
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failed] == ["huge"] and "HTTP 400" in failed[0]["error"]
    assert "context" in failed[0]["error"].lower() or "length" in failed[0]["error"].lower()
    assert [json.loads(x)["id"] for x in (out / "skipped.jsonl").read_text().splitlines()] == ["bad"]
    assert (out / "config.yaml").exists()


def _pgid_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.slow
def test_ctrl_c_leaves_no_server_process(smollm2_dir, tmp_path):
    # 48 requests for long answers, one at a time: minutes of work left when the first shard lands, so the
    # Ctrl-C always arrives mid-run (with _write_input's 12 short answers a fast machine finished first)
    rows = [{"id": f"long{i:02d}", "messages": [{"role": "user", "content": f"Write a long story about room {i}."}]}
            for i in range(48)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = _cli(out, tmp_path / "in.jsonl", f"target.path={smollm2_dir}", "sample.server.launch=true",
               "sample.server.extra_args=[--enforce-eager]")  # no compilation: a faster start-up
    cmd = [{"sample.max_tokens=16": "sample.max_tokens=256", "sample.concurrency=2": "sample.concurrency=1"}.get(a, a)
           for a in cmd]
    assert "sample.max_tokens=256" in cmd and "sample.concurrency=1" in cmd
    # SIGINT as a terminal delivers it: a test run started in the background (`cmd &` in a script) ignores SIGINT,
    # its children inherit that, and Python then leaves it ignored, so the Ctrl-C would never arrive
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 900
    while _rows_on_disk(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    started = re.search(r"started vLLM \(pid (\d+), pgid (\d+)\)", (out / "sample.log").read_text())
    assert started and proc.poll() is None, proc.stdout.read().decode()[-3000:]
    pgid = int(started.group(2))
    assert _pgid_members(pgid), "the server should be running"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal does to us
    proc.wait(timeout=120)
    assert proc.returncode != 0
    time.sleep(1)
    assert _pgid_members(pgid) == []  # no live process of the server's group
    # ... and the group itself goes away once init has reaped the exited processes (zombies until then)
    deadline = time.monotonic() + 60
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"process group {pgid} still exists: {_pgid_members(pgid)}"
        time.sleep(0.5)
    assert not (out / "manifest.json").exists() and _rows_on_disk(out) >= 1  # left for sample.resume


# ---------------------------------------------------------------------------------------------------------------
# The launcher itself (common.server.ServerProcess), engine-agnostic and fast: a stand-in server that starts a child
# in its own process group (like vLLM's engine processes) and serves /health, fails at start-up, or never answers.

FAKE_SERVER = r'''
import http.server, os, signal, subprocess, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
# a child that ignores SIGTERM: only the SIGKILL of the whole group removes it
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("fake server starting", flush=True)
if mode == "fail":
    print("boom: no such model", flush=True)
    sys.exit(3)
if mode in ("hang", "stubborn"):   # stubborn: healthy, but only SIGKILL stops it (a server draining requests)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "hang":
    time.sleep(600)

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _fake(tmp_path: Path, mode: str, **kw):
    from common.server import ServerProcess, free_port

    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = free_port()
    return ServerProcess([sys.executable, str(script), mode, str(port)], port=port, name="fake",
                         log_file=tmp_path / "server.log", **kw)


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _pgid_members(pgid):
        assert time.monotonic() < deadline, f"process group {pgid} still has {_pgid_members(pgid)}"
        time.sleep(0.1)


def test_launcher_success_stops_the_whole_group(tmp_path):
    with _fake(tmp_path, "ok", startup_timeout=60, stop_timeout=2) as server:
        pgid = server.proc.pid
        deadline = time.monotonic() + 10
        while len(_pgid_members(pgid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_pgid_members(pgid)) == 2  # the server and its child
    assert server.proc is None
    _wait_group_gone(pgid)
    assert "fake server starting" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("mode,error,match", [("fail", RuntimeError, r"fake exited with code 3"),
                                              ("hang", TimeoutError, r"fake not healthy after")])
def test_launcher_failure_shows_the_log_tail_and_leaves_nothing(tmp_path, mode, error, match):
    server = _fake(tmp_path, mode, startup_timeout=3, stop_timeout=1)
    with pytest.raises(error, match=match) as info:
        with server:
            pass
    assert "fake server starting" in str(info.value)  # the server's log tail
    assert mode != "fail" or "boom: no such model" in str(info.value)
    log_text = (tmp_path / "server.log").read_text()
    assert "fake server starting" in log_text
    assert server.proc is None and server.pid
    _wait_group_gone(server.pid)  # the SIGTERM-ignoring child (and, for "hang", the server) got the SIGKILL


def test_replicas_stop_together_on_one_deadline(tmp_path):
    """Replicas that do not exit on SIGTERM are stopped on one shared deadline (SIGTERM to all, then SIGKILL), not
    one stop_timeout after the other: N servers stop in about one timeout, and no process of any group is left."""
    from common.server import stop_servers

    servers = []
    for i in range(3):
        (tmp_path / str(i)).mkdir()
        servers.append(_fake(tmp_path / str(i), "stubborn", startup_timeout=60, stop_timeout=3).start())
    for server in servers:
        server.wait_healthy()
    t0 = time.monotonic()
    stop_servers(servers)
    took = time.monotonic() - t0
    assert 3 <= took < 6, f"3 servers with a 3 s stop timeout took {took:.1f} s (one after the other: >= 9 s)"
    for server in servers:
        assert server.proc is None
        _wait_group_gone(server.pid)


def test_launcher_ctrl_c_stops_the_whole_group(tmp_path):
    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
    parent = tmp_path / "parent.py"
    parent.write_text(f'''
import sys, time
sys.path.insert(0, {str(REPO)!r})
from common.server import ServerProcess, free_port
port = free_port()
with ServerProcess([sys.executable, {str(tmp_path / "fake_server.py")!r}, "ok", str(port)], port=port, name="fake",
                   log_file={str(tmp_path / "server.log")!r}, startup_timeout=60, stop_timeout=2) as server:
    print("PGID", server.proc.pid, flush=True)
    time.sleep(600)
''')
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()
    assert line.startswith("PGID"), line + proc.stdout.read()
    pgid = int(line.split()[1])
    deadline = time.monotonic() + 10
    while len(_pgid_members(pgid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_pgid_members(pgid)) == 2
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and "KeyboardInterrupt" in out
    _wait_group_gone(pgid)
