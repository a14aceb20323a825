"""Stage 3 entry point: `python -m stage3_train [hydra overrides]` (`make train ARGS="..."`), or under torchrun.

Composes conf/train.yaml (presets: `+preset=NAME`, conf/preset/NAME.yaml, under the command-line overrides), writes
the resolved config to ${train.output}/config.yaml (rank 0), and runs the loop (train.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.entry import config_yaml, hydra_entry
from common.files import atomic_write_text
from common.logs import get_logger
from stage3_train.config import TrainConfig

log = get_logger("stage3")


def _main(resolved: dict[str, Any]) -> None:
    from stage3_train.train import run

    train_cfg = TrainConfig.from_dict(resolved["train"])
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(Path(train_cfg.output) / "config.yaml", config_yaml(resolved))
    result = run(train_cfg, resolved["target"])
    log.info(f"done: step {result['step']}, run folder {result['out']}, export {result['export']}")


main = hydra_entry("train", _main)

if __name__ == "__main__":
    main()
