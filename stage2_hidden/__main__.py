"""``python -m stage2_hidden [hydra overrides]`` (``make hidden``); see conf/hidden.yaml."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import from_dict
from .pipeline import run
from .shards import atomic_write_text


@hydra.main(version_base=None, config_path="../conf", config_name="hidden")
def main(cfg: DictConfig) -> None:
    target, hidden = from_dict(OmegaConf.to_container(cfg, resolve=True))
    manifest = run(target, hidden)
    if manifest is not None:  # rank 0: the resolved config next to the shards
        atomic_write_text(Path(hidden.output) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


if __name__ == "__main__":
    main()
