"""The README a practitioner copies from (issue 25): its order, and every command in it (and in the stage pages it
links) runs against the configs as written.

Each shell block is run by bash with `make`, `python`, `torchrun` and `vllm` replaced by functions that record their
arguments (PATH emptied: nothing else can run), so variables and quoting expand as the reader's shell expands them.
A `make` target that runs a stage and a `python -m` / `torchrun -m` stage entry are then composed by the real entry
with `--cfg job --resolve` through subprocess (no stage runs) and built into the stage's config.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.configs import SECTION_OF_MODULE, build_stage_config

REPO = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/stage1.md", "docs/stage2.md", "docs/stage3.md"]
MAKE_STAGES = {"sample": "stage1_sample", "hidden": "stage2_hidden", "train": "stage3_train",
               "eval": "evaluation.offline", "bench-serve": "evaluation.serve"}
TOOLS = {"stage2_hidden.inspect", "stage3_train.export"}  # repo entries that take paths, not Hydra settings
RECORDER = r"""
set -e
# one write per command: a command run in the background (`vllm serve ... &`) must not interleave with the next one
record() { local r=$1; shift; for arg in "$@"; do r+=$'\037'"$arg"; done; printf '%s\036' "$r"; }
make() { record make "$@"; }
python() { record python "$@"; }
torchrun() { record torchrun "$@"; }
vllm() { record vllm "$@"; }
"""


def blocks(page: str, language: str = "bash") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / page).read_text(), flags=re.S)


def invocations(block: str) -> list[list[str]]:
    """The commands `block` runs, each as its argv, expanded by bash."""
    done = subprocess.run(["/bin/bash", "-c", RECORDER + block + "\nwait"], capture_output=True, text=True,
                          timeout=60, env={"PATH": ""})
    assert done.returncode == 0, f"{block}\n{done.stderr}"
    return [record.split("\x1f") for record in done.stdout.split("\x1e") if record]


def inline_commands(page: str) -> list[str]:
    """The README's `make ...` / `python -m ...` written inline in its text (`make eval`), each a block of its own
    (the stage pages name commands inline with placeholders: `make train ARGS="..." NPROC=N`)."""
    if page != "README.md":
        return []
    return re.findall(r"`((?:make|python -m|torchrun) [^`]+)`", (REPO / page).read_text())


def commands(page: str) -> list[list[str]]:
    return [argv for block in blocks(page) + inline_commands(page) for argv in invocations(block)]


def entry_of(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, arguments) of a `python -m` / `torchrun ... -m` command, None for another program."""
    if argv[0] not in ("python", "torchrun") or "-m" not in argv:
        return None
    at = argv.index("-m")
    return argv[at + 1], argv[at + 2:]


def stage_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(stage module, Hydra overrides) of a command that runs a stage, None for anything else."""
    if argv[0] == "make":
        settings = dict(arg.split("=", 1) for arg in argv[1:] if "=" in arg)
        targets = [arg for arg in argv[1:] if "=" not in arg]
        if len(targets) == 1 and targets[0] in MAKE_STAGES:
            return MAKE_STAGES[targets[0]], shlex.split(settings.get("ARGS", ""))
        return None
    entry = entry_of(argv)
    return entry if entry and entry[0] in SECTION_OF_MODULE else None


def stage_commands() -> list[tuple[str, str, list[str]]]:
    found = [(page, *stage_command(argv)) for page in PAGES for argv in commands(page) if stage_command(argv)]
    assert len(found) >= 10
    return found


@pytest.mark.parametrize("page, module, overrides", stage_commands(),
                         ids=lambda value: " ".join(value) if isinstance(value, list) else str(value))
def test_every_stage_command_composes_and_builds_its_config(page, module, overrides, tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    done = subprocess.run([sys.executable, "-m", module, *overrides, "--cfg", "job", "--resolve"], cwd=work,
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, f"{page}: {module} {' '.join(overrides)}\n{done.stderr[-2000:]}"
    assert list(work.iterdir()) == []  # nothing ran
    build_stage_config(SECTION_OF_MODULE[module], yaml.safe_load(done.stdout), home)


@pytest.mark.parametrize("page", PAGES)
def test_every_other_command_is_a_make_target_or_a_known_program(page):
    phony = re.search(r"^\.PHONY: (.*)$", (REPO / "Makefile").read_text(), flags=re.M).group(1).split()
    repo_packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    for argv in commands(page):
        if stage_command(argv) or argv[0] == "vllm":
            continue
        if argv[0] == "make":
            targets = [arg for arg in argv[1:] if "=" not in arg]
            assert targets and set(targets) <= set(phony), argv
            dry = subprocess.run(["make", "-n", "-C", str(REPO), *argv[1:], "VENV=/venv"], capture_output=True,
                                 text=True, timeout=60)
            assert dry.returncode == 0, f"{argv}: {dry.stderr}"
            continue
        module, _ = entry_of(argv) or (None, None)
        assert module is not None, f"{page}: {argv}"
        if module.split(".")[0] in repo_packages:
            assert module in TOOLS and importlib.util.find_spec(module) is not None, argv
        # else another project's entry (sglang.launch_server): not ours to check


def test_a_server_you_run_gets_the_parsers_of_its_target_file():
    """`vllm serve ... --served-model-name NAME` in the pages passes the flags stage 1 would launch it with."""
    checked = 0
    for page in PAGES:
        for argv in commands(page):
            if argv[:2] != ["vllm", "serve"] or "--served-model-name" not in argv:
                continue
            target = yaml.safe_load((REPO / "conf/target" / f"{argv[argv.index('--served-model-name') + 1]}.yaml")
                                    .read_text())
            for flag, key in (("--reasoning-parser", "reasoning_parser"), ("--tool-call-parser", "tool_call_parser")):
                given = argv[argv.index(flag) + 1] if flag in argv else None
                assert given == target[key], f"{page}: {flag} {given} but conf/target says {key}: {target[key]}"
            checked += 1
    assert checked >= 1


def test_the_readme_reads_in_order():
    """What it is and what to expect, quick start, your model; stage internals live in the linked pages."""
    text = (REPO / "README.md").read_text()
    headings = re.findall(r"^## (.*)$", text, flags=re.M)
    assert headings[:3] == ["What speedup to expect", "Quick start", "Your model on a GPU node"], headings
    quick = text.split("## Quick start")[1].split("\n## ")[0]
    assert [line.split()[1] for line in blocks_in(quick)] == ["setup", "demo", "test"]
    assert 'benchmarks/RESULTS.md, "Served speedup"' in text
    for page in ("docs/stage1.md", "docs/stage2.md", "docs/stage3.md"):
        assert page in text and (REPO / page).is_file()
    for internal in ("transformers serve --continuous-batching", "EAGLE3_TEST_VLLM_URL", "paged|sdpa",
                     "missed by", "engineers", ".ci/run"):
        assert internal not in text, internal


def blocks_in(markdown: str) -> list[str]:
    return [line for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
            for line in block.splitlines() if line.strip()]


def test_the_readme_target_file_is_a_complete_target(tmp_path):
    """The README's example target file holds every setting a target file has, and a stage runs with it from a
    folder of one's own (hydra.searchpath)."""
    from common.target import TargetSpec

    (example,) = blocks("README.md", "yaml")
    target = yaml.safe_load(example)
    assert set(target) == set(yaml.safe_load((REPO / "conf/target/smollm2-135m.yaml").read_text()))
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / f"{target['name']}.yaml").write_text(example)
    done = subprocess.run([sys.executable, "-m", "stage1_sample", f"target={target['name']}",
                           f"hydra.searchpath=[file://{tmp_path}]", "--cfg", "job", "--resolve"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    resolved = yaml.safe_load(done.stdout)
    assert TargetSpec.from_mapping(resolved["target"]).name == target["name"]
    assert resolved["sample"]["output"].endswith(f"sample/{target['name']}")
