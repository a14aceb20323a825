"""Stage 2 end to end on the real SmolLM2-135M-Instruct: shards vs an independent HF forward, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.target import TargetSpec as TargetConfig
from stage2_hidden.config import HiddenConfig
from stage2_hidden.pipeline import run
from stage2_hidden.reader import ShardDataset
from stage2_hidden.format import PARTS
from stage2_hidden.vocab import load_vocab

REPO = Path(__file__).resolve().parent.parent
TOPICS = ["the sea", "a mountain", "coffee", "a library", "the moon", "trains", "rain", "a garden"]


def write_conversations(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            t = TOPICS[i % len(TOPICS)]
            messages = [{"role": "system", "content": "You are a concise assistant."},
                        {"role": "user", "content": f"Tell me one fact about {t}."},
                        {"role": "assistant", "content": f"Here is a fact about {t}: it is often described "
                                                         f"in poems, and people have written about it for "
                                                         f"centuries. Number {i}."},
                        {"role": "user", "content": "Thanks! Shorter please."},
                        {"role": "assistant", "content": f"{t.capitalize()} inspires poets."}]
            f.write(json.dumps({"id": f"conv-{i}", "messages": messages}) + "\n")
    return path


def config(smollm2_dir, inp, out, **kw):
    target = TargetConfig(name="smollm2-135m", path=str(smollm2_dir), dtype="float32", context_length=8192)
    hidden = HiddenConfig(input=str(inp), output=str(out), rows_per_shard=2, batch_tokens=256,
                          draft_vocab_size=64, device="cpu", **kw)
    return target, hidden


def test_shards_match_hf_forward(tmp_path, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    inp = write_conversations(tmp_path / "convs.jsonl", 5)
    manifest = run(*config(smollm2_dir, inp, tmp_path / "out"))
    assert manifest["layer_ids"] == [2, 15, 27] and manifest["hidden_size"] == 576
    assert manifest["num_rows"] == 5 and len(manifest["shards"]) == 3
    assert manifest["accounting"]["input"] == 5 and manifest["accounting"]["written"] == 5
    assert abs(manifest["bytes_per_token"] / (3 * 576 * 2 + 9) - 1) < 0.02
    ds = ShardDataset(tmp_path / "out", verify=True)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for i in (0, 3):
        row = ds[i]
        with torch.no_grad():
            out = ref(row["input_ids"].long()[None], output_hidden_states=True)
        expect = torch.cat([out.hidden_states[j][0] for j in manifest["layer_ids"]], -1)
        # stored bf16 from an fp32 forward: equal up to bf16 rounding
        torch.testing.assert_close(row["hidden"].float(), expect, atol=2e-2, rtol=1e-2)
        assert torch.equal(row["target_ids"].long(), out.logits[0].argmax(-1))
        spans = tok.decode(row["input_ids"][row["loss_mask"].bool()].tolist())
        assert spans.endswith("inspires poets.<|im_end|>") and "Tell me" not in spans
    d2t, t2d = load_vocab(tmp_path / "out")
    assert len(d2t) == 64 and len(t2d) == 49152 and 0 < manifest["coverage"] <= 1


def test_too_long_skipped_and_counted(tmp_path, smollm2_dir):
    inp = write_conversations(tmp_path / "convs.jsonl", 3)
    with pytest.raises(ValueError, match=r"nothing to write.*all 3 of its conversations were skipped.*too_long"):
        run(*config(smollm2_dir, inp, tmp_path / "out", max_length=40, on_too_long="skip"))
    manifest = run(*config(smollm2_dir, inp, tmp_path / "out", max_length=40, on_too_long="skip", allow_empty=True))
    assert manifest["num_rows"] == 0 and manifest["shards"] == []
    assert manifest["accounting"]["skipped"] == {"too_long": 3}


def test_empty_input_exits_non_zero_unless_allowed(tmp_path, smollm2_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(_cli(smollm2_dir, empty, tmp_path / "out"), cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert res.returncode != 0
    assert f"hidden.input={empty}: it has no conversations" in res.stderr and "hidden.allow_empty=true" in res.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest = run(*config(smollm2_dir, empty, tmp_path / "allowed", allow_empty=True))
    assert manifest["num_rows"] == 0 and manifest["accounting"]["input"] == 0


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.arrow")) + [folder / "vocab.safetensors"]}


def _without_timing(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("created_at", "elapsed_s")}


def test_resume_rewrites_a_damaged_complete_shard(tmp_path, smollm2_dir, caplog):
    inp = write_conversations(tmp_path / "convs.jsonl", 5)
    cfg = config(smollm2_dir, inp, tmp_path / "out")
    clean = run(*cfg)
    before = _snapshot(tmp_path / "out")
    shard = tmp_path / "out" / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in a complete shard; manifest and record untouched
    shard.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="eagle3.stage2"):
        again = run(*cfg)
    assert f"{shard}: sha256 mismatch" in caplog.text and "rewriting it" in caplog.text
    assert _snapshot(tmp_path / "out") == before  # rewritten byte for byte as the clean run wrote it
    assert _without_timing(again) == _without_timing(clean)
    ShardDataset(tmp_path / "out", verify=True)


def test_full_disk_says_what_the_rest_needs(tmp_path, smollm2_dir, monkeypatch):
    import errno
    import re

    from stage2_hidden.format import bytes_per_token
    from stage2_hidden.pipeline import ShardWriteError
    from stage2_hidden.shards import _HashingSink

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    inp = write_conversations(tmp_path / "convs.jsonl", 5)
    out = tmp_path / "out"
    monkeypatch.setattr(_HashingSink, "write", full)
    with pytest.raises(ShardWriteError) as info:
        run(*config(smollm2_dir, inp, out))
    message = str(info.value)
    assert message.startswith(f"no space left on device writing shards to {out} (") and "same command" in message
    found = re.search(r"the 3 shards still to write need about [\d.]+ GiB \((\d+) bytes/token x ([\d,]+) tokens\)",
                      message)
    assert found, message
    monkeypatch.undo()
    manifest = run(*config(smollm2_dir, inp, out))  # space back: the same command finishes the run
    assert int(found[1]) == bytes_per_token(3 * 576, 3, "bfloat16")
    assert int(found[2].replace(",", "")) == manifest["num_tokens"]


def test_settings_change_refused(tmp_path, smollm2_dir):
    inp = write_conversations(tmp_path / "convs.jsonl", 2)
    run(*config(smollm2_dir, inp, tmp_path / "out"))
    with pytest.raises(ValueError, match="other settings.*layer_ids"):
        run(*config(smollm2_dir, inp, tmp_path / "out", layer_ids=[1, 2, 3]))


def _cli(smollm2_dir, inp, out) -> list[str]:
    return [sys.executable, "-m", "stage2_hidden", f"target.path={smollm2_dir}", "target.dtype=float32",
            f"hidden.input={inp}", f"hidden.output={out}", "hidden.rows_per_shard=2", "hidden.batch_tokens=128",
            "hidden.device=cpu", "hidden.draft_vocab_size=64", f"hydra.run.dir={out}/.hydra"]


@pytest.mark.slow
def test_kill_and_resume_byte_identical(tmp_path, smollm2_dir):
    inp = write_conversations(tmp_path / "convs.jsonl", 8)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_cli(smollm2_dir, inp, clean), check=True, cwd=REPO, env=env, capture_output=True)

    proc = subprocess.Popen(_cli(smollm2_dir, inp, killed), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # kill once shard 0 is complete and a later shard is half-written (writer threads run in parallel)
    while not ((killed / "shard-00000.arrow").exists() and list(killed.glob(".tmp-shard-*"))):
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "shard-00000.arrow").exists() and not (killed / "manifest.json").exists()
    (killed / PARTS / "shard-00000.arrow.json").unlink(missing_ok=True)  # as if killed before the part file
    subprocess.run(_cli(smollm2_dir, inp, killed), check=True, cwd=REPO, env=env, capture_output=True)

    names = sorted(p.name for p in clean.glob("shard-*.arrow"))
    assert names == sorted(p.name for p in killed.glob("shard-*.arrow")) and len(names) == 4
    for name in names + ["vocab.safetensors"]:
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name
    timing = ("created_at", "elapsed_s")
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (clean, killed))
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert not list(killed.glob(".tmp-*"))
    assert (killed / "config.yaml").exists()


@pytest.mark.slow
def test_two_ranks_write_the_same_shards_as_one(tmp_path, smollm2_dir):
    """torchrun with 2 gloo ranks: rank r writes shards r, r+2, ...; one manifest at the end, and the merged
    result is byte for byte the 1-process run (same shards, vocabulary and manifest up to timing)."""
    inp = write_conversations(tmp_path / "convs.jsonl", 6)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(smollm2_dir, inp, one), check=True, cwd=REPO, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cli = _cli(smollm2_dir, inp, two)
    res = subprocess.run(torchrun + cli[1:], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]

    names = sorted(p.name for p in one.glob("shard-*.arrow"))
    assert len(names) == 3 and names == sorted(p.name for p in two.glob("shard-*.arrow"))
    for name in names + ["vocab.safetensors"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    timing = ("created_at", "elapsed_s")
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert [r["id"] for r in ShardDataset(two, verify=True)] == [f"conv-{i}" for i in range(6)]


def test_device_map_runs_in_one_process_only():
    """device_map=auto spreads one copy over every GPU the process sees; torchrun's ranks all see the same GPUs."""
    from stage2_hidden.config import HiddenConfig
    from stage2_hidden.pipeline import check_device_map

    check_device_map(HiddenConfig(device_map="auto"), 1)
    check_device_map(HiddenConfig(), 8)
    with pytest.raises(ValueError, match="hidden.device_map=auto .* 8 processes .* run one process"):
        check_device_map(HiddenConfig(device_map="auto"), 8)
