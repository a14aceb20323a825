"""Stage 1 with ``sample.server.engine=transformers``: a real ``transformers serve`` (continuous batching, CPU)
on SmolLM2 regenerates conversations turn by turn; it returns text only, so stage 2 re-tokenises, and the loss
mask of such a row equals the one built from server token ids. The launcher leaves no server process behind
after success and failure."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stage1_sample.client import ChatClient
from stage1_sample.formats import load_conversations
from stage1_sample.regenerate import regenerate
from tests.test_stage1_server import THREE_TURNS, _pgid_members

REPO = Path(__file__).resolve().parent.parent
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "seed": 0, "chat_template_kwargs": {}}


def _renderer(smollm2_dir):
    from transformers import AutoTokenizer

    from stage2_hidden.render import ChatRenderer

    return ChatRenderer(AutoTokenizer.from_pretrained(smollm2_dir))


def test_row_without_server_ids_gets_the_same_loss_mask_as_one_with_them(smollm2_dir):
    from stage2_hidden.render import RenderStats

    r = _renderer(smollm2_dir)
    tok = r.tok
    end = tok.convert_tokens_to_ids("<|im_end|>")
    text = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue, like the sky.", "finish_reason": "stop"},
            {"role": "user", "content": "And a fruit?"},
            {"role": "assistant", "content": "An apple 🍎, crisp and red.", "finish_reason": "stop"}]
    # what vLLM would have stored: the prompt it saw and the ids it sampled (answer + end of turn) on each turn
    with_ids = [dict(m) for m in text]
    for k, m in enumerate(with_ids):
        if m["role"] == "assistant":
            m["prompt_token_ids"] = r.prompt_ids(with_ids[:k])
            m["completion_token_ids"] = tok.encode(m["content"], add_special_tokens=False) + [end]
    stats = RenderStats()
    a = r.render("ids", with_ids, stats=stats)
    b = r.render("text", text, stats=stats)
    assert (a.source, b.source) == ("server_ids", "template") and stats.server_ids == 1
    assert stats.server_ids_mismatch == 0
    n = len(a.input_ids)  # the template adds the newline after the last <|im_end|> (not trained on)
    assert b.input_ids[:n].tolist() == a.input_ids.tolist() and b.loss_mask[:n].tolist() == a.loss_mask.tolist()
    assert not b.loss_mask[n:].any()
    # the mask is exactly the two answers and their end-of-turn tokens
    answers = [tok.encode(m["content"], add_special_tokens=False) + [end] for m in text if m["role"] == "assistant"]
    assert b.input_ids[b.loss_mask.astype(bool)].tolist() == answers[0] + answers[1]


# -------------------------------------------------------------------------------- real transformers serve (slow)
# The CLI test launches its own server; put first so that, in this file, it runs before the session fixture starts
# (one model server at a time on a shared CPU).

def _write_input(path: Path) -> None:
    rows = [
        {"id": "a", "messages": [{"role": "system", "content": "You are a terse assistant."},
                                 {"role": "user", "content": "Name a colour."},
                                 {"role": "assistant", "content": "ORIGINAL ONE"},
                                 {"role": "user", "content": "Name another one."},
                                 {"role": "assistant", "content": "ORIGINAL TWO"}]},
        {"id": "bad", "messages": [{"role": "assistant", "content": "no user here"}]},
        {"id": "b", "messages": [{"role": "user", "content": "Say hello."}]},
        {"id": "c", "messages": [{"role": "user", "content": "Count to three."},
                                 {"role": "assistant", "content": "ORIGINAL"},
                                 {"role": "user", "content": "Now backwards."}]},  # ends on user: one more answer
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_cli_engine_transformers_turn_by_turn_then_no_process_left(smollm2_dir, tmp_path):
    _write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stage1_sample", f"sample.input={tmp_path / 'in.jsonl'}", f"sample.output={out}",
           f"target.path={smollm2_dir}", "sample.server.engine=transformers", "sample.server.launch=true",
           "sample.advanced.server.cb_num_blocks=32", "sample.advanced.server.cb_max_batch_tokens=512",
           "sample.max_tokens=16", "sample.temperature=0", "sample.concurrency=2", "sample.advanced.max_retries=1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = re.search(r"accounting: input (\d+) = written (\d+) \+ skipped (\d+) \+ failed (\d+) \(resumed (\d+); "
                     r"(\d+) tokens generated in [\d.]+ s = [\d.]+ output tokens/s\)", done.stdout)
    assert line, done.stdout
    assert [int(x) for x in line.groups()[:5]] == [4, 3, 1, 0, 0]
    assert "token ids: 0 conversations with the server's ids, 3 without" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["accounting"] == {"input": 4, "written": 3, "skipped": 1, "failed": 0}
    assert manifest["token_ids"] == {"with_server_ids": 0, "without_server_ids": 3}
    assert manifest["server"]["engine"] == "transformers"
    tp = manifest["throughput"]
    assert tp["output_tokens"] == int(line.group(6)) > 0 and tp["seconds"] > 0
    assert tp["output_tokens_per_s"] == pytest.approx(tp["output_tokens"] / tp["seconds"], rel=0.01)
    assert "out_tok/s" in done.stderr  # the progress bar shows output tokens/s beside the conversations
    convs = {c.id: c for c in load_conversations(out)}
    assert sorted(convs) == ["a", "b", "c"]
    roles = {cid: [m["role"] for m in c.messages] for cid, c in convs.items()}
    assert roles == {"a": ["system", "user", "assistant", "user", "assistant"], "b": ["user", "assistant"],
                     "c": ["user", "assistant", "user", "assistant"]}
    for c in convs.values():
        for m in c.messages:
            if m["role"] == "assistant":
                assert m["content"].strip() and "ORIGINAL" not in m["content"]
                assert m["finish_reason"] in ("stop", "length") and "completion_token_ids" not in m
    # the launcher: its log line, the server log in the output folder, and no process of its group left
    started = re.search(r"started transformers serve \(pid (\d+), pgid (\d+)\)", (out / "sample.log").read_text())
    assert started, (out / "sample.log").read_text()[-3000:]
    assert (out / "server.log").read_text().strip()
    assert _pgid_members(int(started.group(2))) == []
    # stage 2 takes the text-only rows through the chat template
    from stage2_hidden.render import RenderStats, fit_length

    r, stats = _renderer(smollm2_dir), RenderStats()
    for c in convs.values():
        row = fit_length(r.render(c.id, c.messages, stats=stats), 4096, "skip", stats)
        assert row is not None and row.source == "template" and row.loss_mask.any()
    assert stats.server_ids == 0 and stats.server_ids_mismatch == 0


@pytest.mark.slow
def test_launcher_failure_of_transformers_serve_leaves_no_process(tmp_path):
    from common.server import free_port, launch, server_command

    port = free_port()
    cmd = server_command("transformers", str(tmp_path / "no-such-model"), "x", port, gpu=False)
    server = launch("transformers", cmd, port=port, log_file=tmp_path / "server.log", startup_timeout=300)
    with pytest.raises(RuntimeError, match="transformers serve exited with code") as info:
        with server:
            pass
    assert "no-such-model" in str(info.value)  # the server's own error, from its log tail
    assert server.proc is None and _pgid_members(server.pid) == []


@pytest.mark.slow
def test_regenerate_turn_by_turn_through_transformers_serve(transformers_server, smollm2_dir):
    url, model = transformers_server
    conv = THREE_TURNS
    seen: list[int] = []

    async def go():
        async with ChatClient([url], model, timeout=120, max_retries=2, return_token_ids=False) as client:
            return await regenerate(client, conv, SAMPLING, on_tokens=seen.append)

    record, num_tokens = asyncio.run(go())
    msgs = record["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    answers = [m for m in msgs if m["role"] == "assistant"]
    assert all(m["content"].strip() and "ORIGINAL" not in m["content"] for m in answers)
    assert all("prompt_token_ids" not in m and "completion_token_ids" not in m for m in answers)
    assert len(seen) == 3 and all(0 < n <= SAMPLING["max_tokens"] for n in seen) and num_tokens == sum(seen)
    # greedy: the same answers again (continuous batching shares one sampling config: ours never changes)
    assert asyncio.run(go())[0] == record


@pytest.mark.slow
def test_temperature_samples_through_transformers_serve(smollm2_dir, tmp_path):
    """sample.temperature > 0 really samples on transformers serve: the request carries the model's generation
    config with do_sample on (common.server.sampling_fields). A server of its own: with continuous batching the
    first request fixes the sampling config, and the shared fixture's server is greedy."""
    from common.server import free_port, launch, sampling_fields, server_command

    port = free_port()
    cmd = server_command("transformers", str(smollm2_dir), "x", port, dtype="bfloat16",
                         cb={"cb_num_blocks": 32, "cb_max_batch_tokens": 512}, gpu=False)
    extra = sampling_fields("transformers", str(smollm2_dir), 1.0, 1.0)
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]

    async def answers():
        async with ChatClient([f"http://127.0.0.1:{port}"], str(smollm2_dir), timeout=120, max_retries=1,
                              return_token_ids=False, extra_body=extra) as client:
            results = [await client.chat(messages, temperature=1.0, max_tokens=24) for _ in range(4)]
        return [r.message["content"] for r in results]

    with launch("transformers", cmd, port=port, log_file=tmp_path / "server.log", startup_timeout=600):
        texts = asyncio.run(answers())
    assert all(t.strip() for t in texts) and len(set(texts)) >= 2, texts  # greedy would give 4 equal answers


@pytest.mark.slow
def test_cli_replicas_spread_the_requests_then_no_process_left(smollm2_dir, tmp_path):
    """sample.server.replicas=2: stage 1 starts two servers side by side, round-robins the turns over both (each
    log shows answered requests) and stops both process groups at the end."""
    _write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stage1_sample", f"sample.input={tmp_path / 'in.jsonl'}", f"sample.output={out}",
           f"target.path={smollm2_dir}", "sample.server.engine=transformers", "sample.server.replicas=2",
           "sample.advanced.server.cb_num_blocks=32", "sample.advanced.server.cb_max_batch_tokens=512",
           "sample.max_tokens=8", "sample.temperature=0", "sample.concurrency=2", "sample.advanced.max_retries=1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["accounting"]["written"] == 3
    for i in range(2):
        assert "POST /v1/chat/completions" in (out / f"server-{i}.log").read_text(), i
    groups = re.findall(r"started transformers serve \(pid \d+, pgid (\d+)\)", (out / "sample.log").read_text())
    assert len(groups) == 2 and all(_pgid_members(int(g)) == [] for g in groups)
