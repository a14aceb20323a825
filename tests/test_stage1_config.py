"""Stage 1 config: conf/sample.yaml composes with the target preset; bad values are clear ValueErrors."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from common.target import TargetSpec as TargetInfo
from stage1_sample.config import SampleConfig
from common.server import vllm_command

CONF = Path(__file__).resolve().parent.parent / "conf"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))


def test_sample_yaml_composes_and_validates():
    cfg = _compose("sample.num_prompts=16", "sample.max_tokens=64", "target=qwen3-8b")
    sample = SampleConfig.from_omegaconf(cfg.sample)
    assert sample.num_prompts == 16 and sample.max_tokens == 64 and sample.server.launch
    assert sample.output_dir == "data/sample/qwen3-8b"
    assert sample.chat_template_kwargs == {"enable_thinking": True}  # from the target preset
    assert sample.server.env == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    target = TargetInfo.from_mapping(dict(cfg.target))
    assert target.served_name == "qwen3-8b"


@pytest.mark.parametrize("override,match", [
    ("sample.format=xml", "sample.format"),
    ("sample.concurrency=0", "sample.concurrency"),
    ("sample.top_p=1.5", "sample.top_p"),
    ("sample.num_prompts=0", "sample.num_prompts"),
    ("sample.server.launch=false", "sample.server.urls"),
    ("sample.server.urls=[localhost:8000]", "http://"),
    ("+sample.tempreature=1", "unknown sample"),
])
def test_bad_values_are_value_errors(override, match):
    with pytest.raises(ValueError, match=match):
        SampleConfig.from_omegaconf(_compose(override).sample)


def test_vllm_command_cpu_and_gpu():
    cpu = vllm_command("/m", "name", 8001, gpu=False, extra_args=["--enforce-eager"])
    assert cpu[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"] and cpu[4] == "/m"
    assert cpu[cpu.index("--host") + 1] == "127.0.0.1" and cpu[-1] == "--enforce-eager"
    gpu = vllm_command("org/model", "name", 8001, gpu=True, max_model_len=None, trust_remote_code=True)
    assert gpu[:3] == ["vllm", "serve", "org/model"] and "--max-model-len" not in gpu
    assert "--trust-remote-code" in gpu
