"""The commands as a practitioner types them (issue 25): what `make` runs, the entries from any working directory
and from an installed copy, and command lines that fail in one line before any model loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def make_dry_run(*args: str) -> str:
    """The commands `make -n ARGS` would run (nothing runs; the venv need not exist)."""
    done = subprocess.run(["make", "-n", "-C", str(REPO), *args, "VENV=/venv"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("target, module", [("hidden", "stage2_hidden"), ("train", "stage3_train")])
def test_make_runs_torchrun_when_nproc_is_above_one(target, module):
    many = make_dry_run(target, "NPROC=8", "ARGS=target=qwen3-8b")
    assert f"/venv/bin/torchrun --nproc-per-node 8 -m {module} target=qwen3-8b" in many.splitlines()
    one = make_dry_run(target, "ARGS=target=qwen3-8b")
    assert f"/venv/bin/python -m {module} target=qwen3-8b" in one.splitlines() and "torchrun" not in one
