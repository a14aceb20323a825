"""The commands as a practitioner types them (issue 25): what `make` runs, the entries from any working directory
and from an installed copy, and command lines that fail in one line before any model loads."""
from __future__ import annotations

import os
import shutil
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


# ------------------------------------------------------------------ the entries from anywhere, and installed

ENTRIES = ["stage1_sample", "stage2_hidden", "stage3_train", "evaluation.offline", "evaluation.serve"]
SOURCES = ["pyproject.toml", "README.md", "conf", "common", "embedded", "evaluation", "stage1_sample",
           "stage2_hidden", "stage3_train"]


def run_entry(module: str, *args: str, cwd: Path, pythonpath: Path = REPO,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(pythonpath), **(env or {})})


def test_pyproject_packages_every_package_and_the_configs():
    import tomllib

    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert set(setuptools_cfg["packages"]) == on_disk | {"common.conf", "common.conf.preset", "common.conf.target"}
    assert setuptools_cfg["package-dir"] == {"common.conf": "conf"}
    assert {p.name for p in (REPO / "conf").iterdir() if p.is_dir()} == {"preset", "target"}


@pytest.mark.parametrize("module", ENTRIES)
def test_entries_compose_from_another_working_directory(module, tmp_path):
    done = run_entry(module, "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "target:" in done.stdout and "smollm2-135m" in done.stdout
    assert list(tmp_path.iterdir()) == []  # --cfg job writes nothing


def test_an_installed_copy_runs_from_any_folder(tmp_path):
    """`pip install .` (here into a folder, from a copy of the sources: the build writes build/ beside them)."""
    src, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (site / "common" / "conf" / "preset" / "demo.yaml").is_file()
    done = run_entry("stage3_train", "+preset=demo", "--cfg", "job", cwd=work, pythonpath=site)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "max_tokens: 512" in done.stdout  # conf/preset/demo.yaml, found inside the installed copy
