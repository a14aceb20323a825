"""Stage-2 settings (the ``hidden:`` group of conf/hidden.yaml, its ``advanced:`` block folded in by
``common.advanced``; the target preset is ``common.target.TargetSpec``).

Plain dataclasses, no Hydra import, so the GPU benchmark and tests can use them directly.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from common.advanced import merge_advanced, setting_name
from common.target import TargetSpec

ADVANCED = ("shard_bytes", "lm_head_chunk", "writer_queue", "writer_threads")  # under hidden.advanced


@dataclass
class HiddenConfig:
    input: str = "data/sample/smollm2-135m"
    output: str = "data/hidden/smollm2-135m"
    layer_ids: list[int] | None = None
    max_length: int | None = None
    on_too_long: str = "truncate"
    batch_tokens: int = 8192
    rows_per_shard: int | None = 256
    shard_bytes: int | None = None
    draft_vocab_size: int = 32000
    dtype: str | None = None
    storage_dtype: str = "bfloat16"
    device: str = "auto"
    device_map: str | None = None
    lm_head_chunk: int = 4096
    num_prompts: int | None = None  # first N input conversations (as sample.num_prompts); None = all
    writer_queue: int = 2
    writer_threads: int = 2
    allow_empty: bool = False  # an input that yields no rows is an error (stage 3 would have nothing to train on)
    # a conversation whose first user turn is an evaluation prompt (MT-bench / HumanEval / GSM8K) is skipped and
    # counted: a draft trained on the prompts it is scored on would be measured on what it memorised
    drop_eval_prompts: bool = True

    def __post_init__(self):
        if self.on_too_long not in ("truncate", "skip"):
            raise ValueError(f"hidden.on_too_long must be truncate or skip, got {self.on_too_long!r}")
        for name in ("batch_tokens", "lm_head_chunk", "draft_vocab_size", "writer_queue", "writer_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{setting(name)} must be >= 1")
        if self.rows_per_shard is None and self.shard_bytes is None:
            raise ValueError("set hidden.rows_per_shard or hidden.advanced.shard_bytes (or both)")
        for name in ("rows_per_shard", "shard_bytes", "max_length", "num_prompts"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{setting(name)} must be >= 1 or null")
        from .format import check_storage_dtype

        check_storage_dtype(self.storage_dtype)
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"hidden.dtype must be bfloat16, float16, float32 or null, got {self.dtype!r}")


def setting(field_name: str) -> str:
    return setting_name("hidden", field_name, ADVANCED)


def _build(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**data)


def from_dict(cfg: dict[str, Any]) -> tuple[TargetSpec, HiddenConfig]:
    """(target, hidden) from the resolved top-level config dict."""
    hidden = merge_advanced(cfg.get("hidden") or {}, "hidden")
    return TargetSpec.from_mapping(dict(cfg.get("target") or {})), _build(HiddenConfig, hidden)
