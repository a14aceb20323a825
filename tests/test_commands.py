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
    assert "steps: 600" in done.stdout  # conf/preset/demo.yaml, found inside the installed copy


# ------------------------------------------------------------------ a command line the command cannot run

def one_error_line(done: subprocess.CompletedProcess, command: str) -> str:
    """The failed command's stderr, which must be one line `COMMAND: error: ...` (no traceback)."""
    assert done.returncode != 0, done.stdout[-2000:]
    lines = [line for line in done.stderr.splitlines() if f"{command}: error: " in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("command, preset, unread", [("stage3_train", "demo_sample", "`sample`"),
                                                     ("stage2_hidden", "node_8b", "`train`"),
                                                     ("stage1_sample", "demo", "`train`")])
def test_a_stage_refuses_a_preset_for_another_stage(command, preset, unread, tmp_path):
    for extra in ([], ["--cfg", "job"]):  # refused before anything runs, so a README check with --cfg job sees it
        done = run_entry(command, f"+preset={preset}", *extra, cwd=tmp_path)
        line = one_error_line(done, command)
        assert done.returncode == 2 and f"does not read the section {unread} (from +preset={preset})" in line
    assert list(tmp_path.iterdir()) == []


def test_the_refusal_names_the_stage_s_own_presets():
    from common.command_line import presets_for

    conf = REPO / "conf"
    train = presets_for({"root", "target", "train"}, conf)
    assert {"demo", "node_8b", "gpt_oss_train_long"} <= set(train) and "demo_sample" not in train
    assert presets_for({"root", "target", "sample"}, conf) == ["demo_sample"]
    sections = [{"root", "target", name} for name in ("sample", "hidden", "train", "eval", "bench")]
    every = sorted({name for readable in sections for name in presets_for(readable, conf)})
    assert every == sorted(p.stem for p in (conf / "preset").glob("*.yaml"))  # each preset serves one command


@pytest.mark.parametrize("override, closest", [("sample.num_prompt=16", "sample.num_prompts"),
                                               ("sampel.num_prompts=16", "sample.num_prompts"),
                                               ("sample.server.replica=2", "sample.server.replicas")])
def test_a_mistyped_key_names_the_closest_known_one(override, closest, tmp_path):
    done = run_entry("stage1_sample", override, cwd=tmp_path)
    line = one_error_line(done, "stage1_sample")
    typed = override.split("=")[0]
    assert line.endswith(f"no setting {typed} in conf/sample.yaml; did you mean {closest}?"), line
    assert "+" + typed not in done.stderr  # not Hydra's advice to add the key
    assert list(tmp_path.iterdir()) == []


def test_stage3_names_a_shard_folder_that_does_not_exist(tmp_path):
    done = run_entry("stage3_train", "train.input=nowhere/hidden", "train.output=runs/train", cwd=tmp_path)
    line = one_error_line(done, "stage3_train")
    assert "nowhere/hidden: no such folder of stage-2 shards" in line and "did not finish" not in line
    assert "make hidden" in line and "HYDRA_FULL_ERROR=1" in line
    assert list(tmp_path.iterdir()) == []  # runs/train (with Hydra's train.log and config.yaml) is gone, runs/ too

    full = run_entry("stage3_train", "train.input=nowhere/hidden", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "InputFileError" in full.stderr


def test_stage3_on_a_folder_without_manifest_says_stage2_did_not_finish(tmp_path):
    (tmp_path / "hidden").mkdir()
    done = run_entry("stage3_train", "train.input=hidden", "train.output=run", cwd=tmp_path)
    line = one_error_line(done, "stage3_train")
    assert "hidden/manifest.json: missing: stage 2 did not finish; re-run the same `make hidden`" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hidden"]


def test_stage2_on_an_unfinished_stage1_folder_says_resume_stage1(tmp_path):
    """What a stage-1 run that died starting its server leaves: its logs, no shards, no manifest."""
    sample = tmp_path / "sample"
    sample.mkdir()
    (sample / "sample.log").write_text("")
    (sample / "server.log").write_text("")
    done = run_entry("stage2_hidden", "hidden.input=sample", "hidden.output=hidden", cwd=tmp_path)
    line = one_error_line(done, "stage2_hidden")
    assert "sample: stage 1 did not finish (it has no manifest.json; it holds sample.log, server.log)" in line
    assert "re-run the same `make sample`" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"]  # no hidden/ left behind


def test_a_missing_relative_path_is_not_sent_to_the_hub(tmp_path):
    done = run_entry("stage1_sample", "sample.input=data/sharegpt/convs.jsonl", "sample.output=out",
                     cwd=tmp_path)
    line = one_error_line(done, "stage1_sample")
    assert f"data/sharegpt/convs.jsonl: no such file or folder (relative paths start at {tmp_path})" in line
    assert "hub" not in done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_hub_name_is_loaded_saying_so(tmp_path):
    """`OWNER/NAME` may be a hub dataset: stage 1 says it is going to the hub, and a refusal names both readings."""
    done = run_entry("stage1_sample", "sample.input=nobody/no-such-set", "sample.output=out", cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1"})
    assert "nobody/no-such-set is not a local file or folder" in done.stdout + done.stderr  # the log line
    line = one_error_line(done, "stage1_sample")
    assert f"nobody/no-such-set: neither a local file or folder (relative paths start at {tmp_path}) nor a " \
           "dataset the hub gives" in line
    assert list(tmp_path.iterdir()) == []


def test_reported_errors_are_one_line_and_the_rest_are_raised(capsys, monkeypatch):
    from common.entry import reported_errors
    from stage2_hidden.format import ShardIntegrityError

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for error in (ShardIntegrityError(Path("h/shard-00000.arrow"), "sha256 mismatch in row 3"),
                  FileNotFoundError("h/vocab.safetensors: missing")):
        with pytest.raises(SystemExit) as stopped, reported_errors("stage3_train"):
            raise error
        assert stopped.value.code == 1
        assert capsys.readouterr().err == f"stage3_train: error: {error} (HYDRA_FULL_ERROR=1 shows the traceback)\n"
    with pytest.raises(RuntimeError), reported_errors("stage3_train"):  # a bug keeps its traceback
        raise RuntimeError("bug")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError), reported_errors("stage3_train"):
        raise ValueError("bad value")


def test_a_failed_run_removes_only_the_folders_it_made_for_nothing(tmp_path):
    from common.entry import OutputFolder

    made = OutputFolder(tmp_path / "runs" / "train", "train.log")  # noted before the run: runs/ does not exist
    (tmp_path / "runs" / "train").mkdir(parents=True)
    (tmp_path / "runs" / "train" / "train.log").write_text("log")
    (tmp_path / "runs" / "train" / "config.yaml").write_text("train: {}")
    made.remove_if_unused()
    assert list(tmp_path.iterdir()) == []

    made = OutputFolder(tmp_path / "train", "train.log")
    (tmp_path / "train" / "checkpoints").mkdir(parents=True)
    (tmp_path / "train" / "checkpoints" / "step-1.pt").write_text("weights")
    made.remove_if_unused()  # the run wrote something: kept
    assert (tmp_path / "train" / "checkpoints" / "step-1.pt").is_file()

    existed = OutputFolder(tmp_path / "train", "train.log")  # a folder that was there before the run
    (tmp_path / "train" / "checkpoints" / "step-1.pt").unlink()
    existed.remove_if_unused()
    assert (tmp_path / "train" / "checkpoints").is_dir()


# ------------------------------------------------------------------ renamed settings and the advanced: blocks

@pytest.mark.parametrize("command, override, new", [
    ("stage1_sample", "sample.output_dir=out", "sample.output"),
    ("stage1_sample", "+sample.output_dir=out", "sample.output"),               # added, not overridden: refused too
    ("stage2_hidden", "hidden.limit=10", "hidden.num_prompts"),
    ("stage3_train", "train.data=hidden", "train.input"),
    ("stage3_train", "train.out=run", "train.output"),
    ("evaluation.offline", "eval.out=report", "eval.output"),
    ("evaluation.serve", "bench.out=report", "bench.output"),
    ("stage1_sample", "sample.rows_per_shard=5", "sample.advanced.rows_per_shard"),
    ("stage1_sample", "sample.server.cb_num_blocks=64", "sample.advanced.server.cb_num_blocks"),
    ("stage2_hidden", "hidden.writer_threads=4", "hidden.advanced.writer_threads"),
    ("stage3_train", "train.log_every=5", "train.advanced.log_every"),
    ("evaluation.offline", "eval.chain_k=[3]", "eval.num_speculative_tokens"),
    ("evaluation.offline", "eval.limits.gsm8k=20", "eval.advanced.limits.gsm8k"),
    ("evaluation.serve", "bench.warmup_requests=1", "bench.advanced.warmup_requests"),
])
def test_an_old_setting_name_is_refused_naming_the_new_one(command, override, new, tmp_path):
    done = run_entry(command, override, "--cfg", "job", cwd=tmp_path)
    line = one_error_line(done, command)
    old = override.lstrip("+").split("=")[0]
    assert done.returncode == 2 and line.endswith(f"{old} is now {new} (conf/{CONFIG_OF[command]}.yaml)"), line
    assert list(tmp_path.iterdir()) == []


CONFIG_OF = {"stage1_sample": "sample", "stage2_hidden": "hidden", "stage3_train": "train",
             "evaluation.offline": "eval", "evaluation.serve": "bench_serve"}


def test_a_preset_with_an_old_name_is_refused(tmp_path):
    """A user's own preset (Hydra's search path) that still says sample.output_dir."""
    (tmp_path / "preset").mkdir()
    (tmp_path / "preset" / "mine.yaml").write_text("# @package _global_\nsample:\n  output_dir: out\n")
    done = run_entry("stage1_sample", f"hydra.searchpath=[file://{tmp_path}]", "+preset=mine", "--cfg", "job",
                     cwd=tmp_path)
    assert "sample.output_dir is now sample.output" in one_error_line(done, "stage1_sample")


@pytest.mark.parametrize("command, flag, new", [
    ("evaluation.offline", "--chain-k", "--num-speculative-tokens"),
    ("evaluation.offline", "--out", "--output"),
    ("evaluation.serve", "--out", "--output"),
])
def test_the_plain_entry_refuses_a_renamed_flag(command, flag, new, tmp_path):
    done = run_entry(command, "--plain", flag, "3", cwd=tmp_path)
    assert done.returncode == 2 and f"{flag} is now {new}" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_renamed_key_has_its_new_name_in_the_configs():
    from common.command_line import RENAMED, compose, dotted_keys

    for old, new in RENAMED.items():
        config = {"sample": "sample", "hidden": "hidden", "train": "train", "eval": "eval",
                  "bench": "bench_serve"}[old.split(".")[0]]
        keys = dotted_keys(compose(REPO / "conf", config, []))
        assert new in keys and old not in keys


def test_an_advanced_block_reaches_the_flat_dataclasses():
    from common.advanced import merge_advanced

    section = {"input": "x", "server": {"engine": "vllm"}, "advanced": {"rows_per_shard": 5, "server": {"port": 9}}}
    assert merge_advanced(section, "sample") == {"input": "x", "server": {"engine": "vllm", "port": 9},
                                                 "rows_per_shard": 5}
    with pytest.raises(ValueError, match="sample.server.port and sample.advanced.server.port are the same setting"):
        merge_advanced({"server": {"port": 1}, "advanced": {"server": {"port": 9}}}, "sample")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "preset").glob("*.yaml")))
def test_every_preset_uses_current_names_and_builds_its_stage_config(preset, tmp_path):
    """Composed with its command as the command line check does (an old or moved key is refused), then built into
    the command's dataclass."""
    import yaml
    from omegaconf import OmegaConf

    from common.command_line import check_command_line, compose
    from tests.fixtures.configs import SECTIONS, build_stage_config

    section = next(key for key in yaml.safe_load((REPO / "conf" / "preset" / f"{preset}.yaml").read_text())
                   if key in SECTIONS)
    config, command = SECTIONS[section]
    overrides = [f"+preset={preset}"]
    check_command_line(REPO / "conf", config, overrides, command)
    resolved = OmegaConf.to_container(compose(REPO / "conf", config, overrides), resolve=True)
    build_stage_config(section, resolved, tmp_path)


@pytest.mark.parametrize("command, override, field, value", [
    ("stage1_sample", "sample.advanced.server.startup_timeout=5", "startup_timeout", 5),
    ("stage2_hidden", "hidden.advanced.writer_threads=3", "writer_threads", 3),
    ("stage3_train", "train.advanced.pad_multiple=16", "pad_multiple", 16),
    ("evaluation.offline", "eval.advanced.dtype=float32", "dtype", "float32"),
])
def test_each_stage_builds_its_config_from_the_advanced_block(command, override, field, value):
    """What each command's loader makes of conf/<name>.yaml with an advanced setting changed."""
    from omegaconf import OmegaConf

    from common.advanced import merge_advanced
    from common.command_line import compose
    from evaluation.offline import EvalConfig
    from stage1_sample.config import SampleConfig
    from stage2_hidden.config import from_dict
    from stage3_train.config import TrainConfig

    resolved = OmegaConf.to_container(compose(REPO / "conf", CONFIG_OF[command], [override]), resolve=True)
    built = {"stage1_sample": lambda: SampleConfig.from_omegaconf(resolved["sample"]).server,
             "stage2_hidden": lambda: from_dict(resolved)[1],
             "stage3_train": lambda: TrainConfig.from_dict(resolved["train"]),
             "evaluation.offline": lambda: EvalConfig(**merge_advanced(resolved["eval"], "eval"))}[command]()
    assert getattr(built, field) == value


# ------------------------------------------------------------------ one length across the stages

def resolved_job(module: str, *overrides: str, cwd: Path) -> dict:
    """The job config a command would run with (`--cfg job --resolve`), parsed."""
    import yaml

    done = run_entry(module, *overrides, "--cfg", "job", "--resolve", cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    return yaml.safe_load(done.stdout)


@pytest.mark.parametrize("overrides, length", [((), 2048), (("max_length=16384",), 16384),
                                               (("target=qwen3-8b", "max_length=null"), None)])
def test_stages_one_and_two_cut_conversations_at_one_length(overrides, length, tmp_path):
    """The top-level max_length is where stage 1 stops a conversation and where stage 2 cuts it."""
    sample = resolved_job("stage1_sample", *overrides, cwd=tmp_path)
    hidden = resolved_job("stage2_hidden", *overrides, cwd=tmp_path)
    assert sample["sample"]["max_conversation_tokens"] == hidden["hidden"]["max_length"] == length
    assert hidden["hidden"]["on_too_long"] == "truncate"  # stage 1's stop is stage 2's cut


def test_stage3_rows_default_to_the_shards_length(tmp_path):
    """train.max_tokens is null by default: the trainer packs rows of what stage 2's manifest records."""
    train = resolved_job("stage3_train", cwd=tmp_path)["train"]
    assert train["max_tokens"] is None and train["steps"] is None and train["epochs"] == 1
