"""Stage 1 config: conf/sample.yaml composes with the target preset; bad values are clear ValueErrors."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from common.target import TargetSpec as TargetInfo
from stage1_sample.config import SampleConfig
from common.server import request_model_name, returns_token_ids, server_command, transformers_command, vllm_command

CONF = Path(__file__).resolve().parent.parent / "conf"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))


def test_sample_yaml_composes_and_validates():
    cfg = _compose("sample.num_prompts=16", "sample.max_tokens=64", "target=qwen3-8b")
    sample = SampleConfig.from_omegaconf(cfg.sample)
    assert sample.num_prompts == 16 and sample.max_tokens == 64 and sample.server.launch
    assert sample.output == "data/sample/qwen3-8b"
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
    ("sample.server.engine=sglang", "sample.server.engine"),
    ("sample.advanced.server.cb_num_blocks=0", "sample.advanced.server.cb_num_blocks"),
    ("sample.advanced.server.cb_max_memory_percent=1.5", "sample.advanced.server.cb_max_memory_percent"),
    ("sample.server.replicas=0", "sample.server.replicas"),
    ("sample.max_conversation_tokens=0", "sample.max_conversation_tokens"),
])
def test_bad_values_are_value_errors(override, match):
    with pytest.raises(ValueError, match=match):
        SampleConfig.from_omegaconf(_compose(override).sample)


@pytest.mark.parametrize("overrides, launched, gpu, expected", [
    ((), True, False, 8),                                                     # a launched CPU server
    (("sample.server.replicas=2",), True, True, 512),                         # 2 launched vLLM servers on a GPU
    (("sample.server.engine=transformers", "sample.server.replicas=8"), True, True, 256),  # 8 x 32
    (("sample.server.urls=[http://127.0.0.1:8000]",), False, True, 64),       # servers this run did not start
    (("sample.concurrency=12", "sample.server.replicas=2"), True, True, 12),  # set: kept
])
def test_concurrency_default_follows_the_servers(overrides, launched, gpu, expected):
    sample = SampleConfig.from_omegaconf(_compose(*overrides).sample)
    assert sample.default_concurrency(launched, gpu) == expected


def test_stage1_resolves_the_concurrency_from_where_its_servers_run(monkeypatch):
    import stage1_sample.__main__ as stage1

    monkeypatch.setattr(stage1, "cuda_available", lambda: False)
    assert stage1.with_concurrency(SampleConfig.from_omegaconf(_compose().sample)).concurrency == 8
    monkeypatch.setattr(stage1, "cuda_available", lambda: True)
    two = SampleConfig.from_omegaconf(_compose("sample.server.replicas=2").sample)
    assert stage1.with_concurrency(two).concurrency == 512
    urls = SampleConfig.from_omegaconf(_compose("sample.server.urls=[http://127.0.0.1:8000]").sample)
    assert stage1.with_concurrency(urls).concurrency == 64


def test_vllm_command_cpu_and_gpu():
    cpu = vllm_command("/m", "name", 8001, gpu=False, extra_args=["--enforce-eager"])
    assert cpu[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"] and cpu[4] == "/m"
    assert cpu[cpu.index("--host") + 1] == "127.0.0.1" and cpu[-1] == "--enforce-eager"
    gpu = vllm_command("org/model", "name", 8001, gpu=True, max_model_len=None, trust_remote_code=True)
    assert gpu[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "org/model"]
    assert "--max-model-len" not in gpu and "--trust-remote-code" in gpu
    assert "--gpu-memory-utilization" not in gpu and "--max-num-seqs" not in gpu   # vLLM's defaults


def test_gpu_launch_settings_reach_the_vllm_command_line(tmp_path):
    """sample.server.{gpu_memory_utilization,max_num_seqs,max_model_len} become the launched vLLM's flags on a
    GPU; replicas split the card when no share is set; a CPU server gets none of the GPU flags."""
    from omegaconf import OmegaConf

    from common.target import TargetSpec
    from stage1_sample.__main__ import stage1_server

    def flags(*overrides, gpu=True):
        cfg = _compose(*overrides)
        sample = SampleConfig.from_omegaconf(cfg.sample)
        import common.server as server
        real = server.cuda_available
        server.cuda_available = lambda: gpu
        try:
            target = TargetSpec.from_mapping(OmegaConf.to_container(cfg.target, resolve=True))
            cmd = stage1_server(sample, target, 8001, tmp_path / "s.log").cmd
        finally:
            server.cuda_available = real
        return {a: cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a.startswith("--")}

    set_ = flags("sample.server.gpu_memory_utilization=0.3", "sample.server.max_num_seqs=512",
                 "sample.server.max_model_len=3072")
    assert set_["--gpu-memory-utilization"] == "0.3" and set_["--max-num-seqs"] == "512"
    assert set_["--max-model-len"] == "3072"
    split = flags("sample.server.replicas=4")
    assert split["--gpu-memory-utilization"] == "0.225" and "--max-num-seqs" not in split
    assert int(split["--max-model-len"]) > 0                      # the target's own length
    cpu = flags("sample.server.gpu_memory_utilization=0.3", "sample.server.max_num_seqs=512", gpu=False)
    assert "--gpu-memory-utilization" not in cpu and "--max-num-seqs" not in cpu


def test_engine_transformers_composes():
    sample = SampleConfig.from_omegaconf(_compose("sample.server.engine=transformers",
                                                  "sample.advanced.server.cb_num_blocks=16").sample)
    assert sample.server.engine == "transformers"
    assert sample.cb_bounds() == {"cb_num_blocks": 16, "cb_max_batch_tokens": None, "cb_max_memory_percent": None}
    assert SampleConfig.from_omegaconf(_compose().sample).server.engine == "vllm"  # the default


def test_transformers_command_bounds_the_cpu_kv_cache():
    cpu = transformers_command("/m", 8001, gpu=False, extra_args=["--log-level", "info"])
    assert cpu[1:5] == ["-m", "transformers.cli.transformers", "serve", "/m"]
    assert cpu[cpu.index("--host") + 1] == "127.0.0.1" and cpu[cpu.index("--port") + 1] == "8001"
    assert "--continuous-batching" in cpu and cpu[-2:] == ["--log-level", "info"]
    assert int(cpu[cpu.index("--cb-num-blocks") + 1]) > 0 and int(cpu[cpu.index("--cb-max-batch-tokens") + 1]) > 0
    gpu = transformers_command("org/m", 8001, gpu=True, trust_remote_code=True)
    assert "--cb-num-blocks" not in gpu and "--cb-max-batch-tokens" not in gpu and "--trust-remote-code" in gpu
    gpu = transformers_command("org/m", 8001, gpu=True, cb_max_memory_percent=0.5, cb_num_blocks=100)
    assert gpu[gpu.index("--cb-max-memory-percent") + 1] == "0.5" and gpu[gpu.index("--cb-num-blocks") + 1] == "100"
    # CUDA graphs for the decode steps on a GPU (transformers leaves them off for paged|sdpa); none on the CPU
    assert "--cb-use-cuda-graph" in gpu and not any("cuda-graph" in a for a in cpu)
    eager = transformers_command("org/m", 8001, gpu=True, cb_use_cuda_graph=False)
    assert "--no-cb-use-cuda-graph" in eager and "--cb-use-cuda-graph" not in eager
    assert server_command("vllm", "/m", "name", 8001, gpu=False) == vllm_command("/m", "name", 8001, gpu=False)
    assert server_command("transformers", "/m", "name", 8001, gpu=False) == transformers_command("/m", 8001, gpu=False)
    with pytest.raises(ValueError, match="engine"):
        server_command("sglang", "/m", "name", 8001)
    # transformers serve is pinned to the path it loaded and returns text only
    assert request_model_name("transformers", "/m", "name") == "/m" and request_model_name("vllm", "/m", "name") == "name"
    assert returns_token_ids("vllm") and not returns_token_ids("transformers")


def test_sampling_fields_turn_sampling_on_for_transformers_serve(smollm2_dir):
    """transformers serve samples only when the request's generation config says do_sample: stage 1 sends the
    model's own config (its eos id kept) with do_sample and the sampling parameters; greedy and vLLM send nothing."""
    import json

    from common.server import sampling_fields

    fields = sampling_fields("transformers", str(smollm2_dir), 0.7, 0.9)
    config = json.loads(fields["generation_config"])
    assert config["do_sample"] is True and config["temperature"] == 0.7 and config["top_p"] == 0.9
    assert config["eos_token_id"] == 2  # SmolLM2's <|im_end|>, from its generation_config.json
    assert sampling_fields("transformers", str(smollm2_dir), 0.0, 1.0) == {}
    assert sampling_fields("vllm", "name", 0.7, 0.9) == {}
