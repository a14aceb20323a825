"""Shared test set-up: markers, the real SmolLM2 folder, and per-area fixture modules.

Slow fixtures (the vLLM CPU server, the converted model) are session-scoped so the suite starts each once.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures.vllm_server", "tests.fixtures.stage3", "tests.fixtures.eval", "tests.fixtures.served", "tests.fixtures.transformers_server"]  # per-area fixture modules under tests/fixtures/


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF folder (converted from the wheel once)."""
    from embedded.smollm2 import ensure_smollm2

    return ensure_smollm2(REPO / "data/models/SmolLM2-135M-Instruct")
