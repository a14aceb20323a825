"""``python -m stage2_hidden [hydra overrides]`` (``make hidden``); see conf/hidden.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.entry import config_yaml, hydra_entry
from common.files import atomic_write_text

from .config import from_dict
from .pipeline import run


def _main(resolved: dict[str, Any]) -> None:
    target, hidden = from_dict(resolved)
    manifest = run(target, hidden)
    if manifest is not None:  # rank 0: the resolved config next to the shards
        atomic_write_text(Path(hidden.output) / "config.yaml", config_yaml(resolved))


main = hydra_entry("hidden", _main)

if __name__ == "__main__":
    main()
