"""Stage 3 entry point: `python -m stage3_train [hydra overrides]` (`make train ARGS="..."`), or under torchrun.

Composes conf/train.yaml, applies `train.preset` (conf/preset/<name>.yaml) beneath the command-line `train.*`
overrides, writes the resolved config to ${train.out}/config.yaml (rank 0), and runs the loop (train.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from stage3_train.config import TrainConfig

CONF = Path(__file__).resolve().parent.parent / "conf"


def apply_preset(cfg: DictConfig, cli_overrides: list[str]) -> DictConfig:
    """cfg + conf/preset/<train.preset>.yaml, then the command line's train.* overrides again (they win)."""
    name = cfg.train.get("preset")
    if not name:
        return cfg
    file = CONF / "preset" / f"{name}.yaml"
    if not file.is_file():
        known = sorted(p.stem for p in (CONF / "preset").glob("*.yaml"))
        raise ValueError(f"train.preset={name!r}: no {file}; known presets: {known}")
    train_cli = [o.lstrip("+") for o in cli_overrides if o.lstrip("+").startswith("train.")]
    return OmegaConf.merge(cfg, OmegaConf.load(file), OmegaConf.from_dotlist(train_cli))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from stage3_train.checkpoint import atomic_write_text
    from stage3_train.train import run

    cfg = apply_preset(cfg, list(HydraConfig.get().overrides.task))
    train_cfg = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(Path(train_cfg.out) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    result = run(train_cfg, OmegaConf.to_container(cfg.target, resolve=True))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[stage3] done: step {result['step']}, run folder {result['out']}, export {result['export']}")


if __name__ == "__main__":
    main()
