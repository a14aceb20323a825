"""The `advanced:` block of each config section: the settings a run rarely needs (writer queues and threads, shard
and chunk sizes, retries, ports, time-outs, server cache bounds), kept apart from the ones a user sets.

    sample:                              # conf/sample.yaml
      input: wheel:sharegpt
      server: {engine: vllm, replicas: 1, ...}
      advanced:
        rows_per_shard: 1000
        server: {port: 0, startup_timeout: 900, ...}

The dataclasses behind the sections stay flat (`SampleConfig.rows_per_shard`, `ServerConfig.port`): every loader
folds the block into its section with `merge_advanced` before building them. A sub-block (`advanced.server`) folds
into the section's mapping of the same name. This module imports nothing beyond the standard library, so the
loaders of machines without Hydra use it too.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ADVANCED = "advanced"


def merge_advanced(section: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`section` (the `name:` block of a resolved config) with its `advanced:` block folded in. A setting given
    both in the block and outside it is a ValueError naming both places."""
    merged = dict(section)
    advanced = merged.pop(ADVANCED, None) or {}
    return fold(merged, advanced, name, f"{name}.{ADVANCED}")


def fold(into: dict[str, Any], extra: Mapping[str, Any], where: str, extra_where: str) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), Mapping):
            into[key] = fold(dict(into[key]), value, f"{where}.{key}", f"{extra_where}.{key}")
        elif key in into:
            raise ValueError(f"{where}.{key} and {extra_where}.{key} are the same setting; set "
                             f"{extra_where}.{key} only")
        else:
            into[key] = value
    return into


def setting_name(section: str, field_name: str, advanced_fields: tuple[str, ...]) -> str:
    """The config key of a flat dataclass field, for messages: `hidden.advanced.writer_queue`, `hidden.input`."""
    return f"{section}.{ADVANCED}.{field_name}" if field_name in advanced_fields else f"{section}.{field_name}"
