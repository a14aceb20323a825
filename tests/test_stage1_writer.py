"""Stage 1 writer: sharding, crash recovery (cut last line, stale partials), manifest, parquet round trip."""
from __future__ import annotations

import json

import pytest

from stage1_sample.formats import Conversation, load_conversations
from common.files import sha256_file
from stage1_sample.writer import ConversationWriter as ShardWriter


def _row(i: int) -> dict:
    return {"id": f"c{i}", "messages": [
        {"role": "user", "content": f"q{i}"},
        {"role": "assistant", "content": f"a{i} ü", "prompt_token_ids": [1, i], "completion_token_ids": [i, 2],
         "finish_reason": "stop", "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "{}"}}]}]}


def _finish(writer, n_written, skipped=0, failed=0):
    acc = {"input": n_written + skipped + failed, "written": n_written, "skipped": skipped, "failed": failed}
    return writer.finish({"target": {"name": "t"}}, acc)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_manifest_and_round_trip(tmp_path, fmt):
    writer = ShardWriter(tmp_path, fmt, rows_per_shard=3)
    for i in range(7):
        writer.write(_row(i))
    writer.skip("s1", "no user turn")
    writer.fail("f1", "HTTP 400: too long")
    manifest = _finish(writer, 7, skipped=1, failed=1)
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{k}.{fmt}" for k in range(3)]
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 1] and manifest["complete"]
    assert manifest["format"] == "eagle3-sample/1"
    assert all(s["sha256"] == sha256_file(tmp_path / s["file"]) for s in manifest["shards"])
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.tmp"))
    back = list(load_conversations(tmp_path))
    assert all(isinstance(c, Conversation) for c in back)
    assert [c.to_json() for c in back] == [_row(i) for i in range(7)]
    assert json.loads((tmp_path / "failed.jsonl").read_text()) == {"id": "f1", "error": "HTTP 400: too long"}
    assert json.loads((tmp_path / "skipped.jsonl").read_text()) == {"id": "s1", "reason": "no user turn"}


def test_bad_accounting_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, "jsonl", rows_per_shard=3)
    writer.write(_row(0))
    with pytest.raises(AssertionError, match="does not add up"):
        writer.finish({}, {"input": 2, "written": 1, "skipped": 0, "failed": 0})


def test_rows_outside_this_pass_input_are_refused(tmp_path):
    """A resumed folder holding rows this pass's input lacks: its manifest would count rows it does not account for."""
    writer = ShardWriter(tmp_path, "jsonl", rows_per_shard=3)
    for i in range(3):
        writer.write(_row(i))
    writer.close()
    again = ShardWriter(tmp_path, "jsonl", rows_per_shard=3, resume=True)
    with pytest.raises(ValueError, match="holds 3 conversations but this pass's input accounts for 2"):
        _finish(again, 2)  # e.g. the input file lost a record between the passes
    assert not (tmp_path / "manifest.json").exists()


def test_recovery_after_a_crash_mid_line(tmp_path):
    writer = ShardWriter(tmp_path, "jsonl", rows_per_shard=3)
    for i in range(5):
        writer.write(_row(i))
    writer._partial.write(b'{"id": "c5", "messages": [{"ro')  # kill -9 in the middle of a write
    writer._partial.flush()
    # no close(): the process died. A stale partial of a finalised shard (crash between the two steps):
    (tmp_path / "shard-00000.jsonl.partial").write_text(json.dumps(_row(0)) + "\n")
    with pytest.raises(ValueError, match="resume=true"):
        ShardWriter(tmp_path, "jsonl", rows_per_shard=3, resume=False)
    again = ShardWriter(tmp_path, "jsonl", rows_per_shard=3, resume=True)
    assert again.done_ids == {f"c{i}" for i in range(5)}
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    with pytest.raises(AssertionError, match="duplicate"):
        again.write(_row(4))
    for i in range(5, 8):
        again.write(_row(i))
    manifest = _finish(again, 8)
    assert [s["rows"] for s in manifest["shards"]] == [3, 2, 3]
    ids = [c.id for c in load_conversations(tmp_path)]
    assert sorted(ids) == sorted(f"c{i}" for i in range(8)) and len(ids) == len(set(ids))


def _text_row(i: int) -> dict:
    """A row from a server that returns no token ids (`transformers serve`)."""
    return {"id": f"t{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                       {"role": "assistant", "content": f"a{i}", "finish_reason": "stop"}]}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_manifest_counts_rows_with_and_without_server_ids_across_resume(tmp_path, fmt):
    writer = ShardWriter(tmp_path, fmt, rows_per_shard=2)
    for i in range(3):
        writer.write(_row(i))
    writer.write(_text_row(0))
    writer.write(_text_row(1))
    writer.close()  # interrupted: the 5th row sits in a partial shard
    again = ShardWriter(tmp_path, fmt, rows_per_shard=2, resume=True)
    assert again.token_ids == {"with_server_ids": 3, "without_server_ids": 2}
    again.write(_text_row(2))
    manifest = _finish(again, 6)
    assert manifest["token_ids"] == {"with_server_ids": 3, "without_server_ids": 3}
    assert sum(manifest["token_ids"].values()) == manifest["num_rows"] == 6
