"""The Hydra entry of every command, and the one preset rule.

    main = hydra_entry("sample", run_stage1)      # conf/sample.yaml; run(resolved config dict)

Presets: `+preset=NAME` composes `conf/preset/NAME.yaml` (each starts with `# @package _global_`, so it may set
any group) over the command's config; command-line overrides are applied after it and win. That is Hydra's own
rule; there is no second mechanism.

Before Hydra runs, the command line is checked (common/command_line.py): a mistyped key names the closest known
one, a section the command does not read (a preset for another stage) is refused. The project's own errors
(`ValueError`: a bad value, an input that cannot be read, a shard that fails its checks; `OSError`: a missing
file or folder, a full disk) end the command with one line on stderr and exit code 1; `HYDRA_FULL_ERROR=1` shows
the traceback instead. A run that fails so leaves no output folder it created and wrote nothing but its log and
config.yaml into.

Machines without Hydra (a bare GPU image): `plain_entry` parses `--field value` for every field of a dataclass
config instead (`--plain`, or automatically when Hydra is not importable).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from common.logs import setup_logging

# the errors a command reports in one line (what is wrong and where, written for the user), not as a traceback
REPORTED_ERRORS = (ValueError, OSError)


def config_dir() -> Path:
    """The Hydra configs, found from this file, never from the working directory: `common/conf` in an installed
    copy (pyproject.toml installs conf/ there), else the checkout's conf/ beside the packages."""
    installed = Path(__file__).resolve().parent / "conf"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "conf"


CONF = config_dir()


def config_yaml(resolved: dict[str, Any]) -> str:
    """The resolved config as the YAML saved beside every output (`config.yaml`), secrets redacted: every
    ``extra_args`` list (server flags such as ``--api-key X``) and ``env`` mapping (``VLLM_API_KEY``, ...) of any
    section goes through ``common.server``'s redaction, so no command writes a key into its output folder."""
    return yaml.safe_dump(redacted(resolved), sort_keys=False, allow_unicode=True)


def redacted(node: Any) -> Any:
    """``node`` with the values of secret server flags and environment variables replaced (recursively)."""
    from common.server import redact_args, redact_env

    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "extra_args" and isinstance(value, list):
                out[key] = redact_args(value)
            elif key == "env" and isinstance(value, dict):
                out[key] = redact_env(value)
            else:
                out[key] = redacted(value)
        return out
    if isinstance(node, list):
        return [redacted(v) for v in node]
    return node


def hydra_entry(config_name: str, run: Callable[[dict[str, Any]], Any]) -> Callable[[], None]:
    """A `main()` that checks the command line, composes conf/<config_name>.yaml with it and calls
    `run(resolved dict)`, reporting the project's errors in one line (module docstring)."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from common.command_line import CommandLineError, check_command_line

    output: OutputFolder | None = None

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name=config_name)
    def hydra_main(cfg: DictConfig) -> None:
        setup_logging()
        with reported_errors(command_name(config_name), cleanup=output.remove_if_unused if output else None):
            run(OmegaConf.to_container(cfg, resolve=True))

    def main() -> None:
        nonlocal output
        command = command_name(config_name)
        try:
            composed = check_command_line(CONF, config_name, sys.argv[1:], command)
        except CommandLineError as e:
            exit_with_line(command, str(e), code=2)
        if composed is not None and composed.run_dir is not None:
            output = OutputFolder(composed.run_dir, composed.job_log)  # before Hydra creates it for its log
        hydra_main()

    return main


def command_name(config_name: str) -> str:
    """`stage3_train` when run as `python -m stage3_train`, else the config's name (for messages)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name.removesuffix(".__main__") or config_name


def exit_with_line(command: str, message: str, code: int = 1) -> None:
    print(f"{command}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def full_error_wanted() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def reported_errors(command: str, cleanup: Callable[[], None] | None = None):
    """Run the body; one of REPORTED_ERRORS ends the command with one line and exit code 1 (the traceback with
    HYDRA_FULL_ERROR=1). `cleanup` runs after any failure."""
    try:
        yield
    except BaseException as e:
        if cleanup is not None:
            cleanup()
        if isinstance(e, REPORTED_ERRORS) and not full_error_wanted():
            exit_with_line(command, f"{e} (HYDRA_FULL_ERROR=1 shows the traceback)")
        raise


class OutputFolder:
    """A run's output folder (hydra.run.dir), noted before the run starts: the outermost folder of its path that
    did not exist yet (None: it existed), and the files the run writes into it before it reads any input."""

    def __init__(self, path: Path, job_log: str | None):
        self.path, self.bookkeeping = path, {"config.yaml", job_log}
        missing = [p for p in (path, *path.parents) if not p.exists()]
        self.created = missing[-1] if missing else None

    def remove_if_unused(self) -> None:
        """Remove the folders this run created for its output if it wrote nothing into them but its bookkeeping
        (rank 0 only: under torchrun the other ranks find them made)."""
        if self.created is None or int(os.environ.get("RANK", "0")) != 0 or not self.created.is_dir():
            return
        files = [p for p in self.created.rglob("*") if not p.is_dir()]
        if all(p.parent == self.path and p.name in self.bookkeeping for p in files):
            shutil.rmtree(self.created, ignore_errors=True)


def has_hydra() -> bool:
    try:
        import hydra  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def plain_parser(config_cls: type, prog: str) -> argparse.ArgumentParser:
    """`--field value` for every field of a dataclass: lists space-separated, dicts as JSON, bools true/false."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--plain", action="store_true", help="argparse instead of Hydra")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        origin = typing.get_origin(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else hint
        base_origin = typing.get_origin(base)
        if base_origin is list:
            item = (typing.get_args(base) or (str,))[0]
            p.add_argument(flag, nargs="*", type=item if item in (int, float) else str)
        elif base_origin is dict or base is dict:
            p.add_argument(flag, type=json.loads, help="JSON object")
        elif base is bool:
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"))
        elif base in (int, float):
            p.add_argument(flag, type=base)
        else:
            p.add_argument(flag)
    return p


def plain_config(config_cls: type, argv: list[str], prog: str, section: str) -> Any:
    """`config_cls` from `--field value` arguments (see `plain_parser`); the flag of a renamed setting
    (common.command_line.RENAMED: `--chain-k` for `eval.chain_k`) is refused naming the new one."""
    parser = plain_parser(config_cls, prog)
    for old, new in renamed_flags(section).items():
        if any(arg == old or arg.startswith(old + "=") for arg in argv):
            parser.error(f"{old} is now {new}")
    args = vars(parser.parse_args(argv))
    return config_cls(**{k: v for k, v in args.items() if v is not None and k != "plain"})


def renamed_flags(section: str) -> dict[str, str]:
    """{old flag: new flag} of the settings of `section` that were renamed (`--chain-k`: `--num-speculative-tokens`)."""
    from common.command_line import RENAMED

    def flag(key: str) -> str:
        return "--" + key.removeprefix(section + ".").replace("_", "-")

    return {flag(old): flag(new) for old, new in RENAMED.items() if old.startswith(section + ".")}


def plain_or_hydra(argv: list[str] | None, config_cls: type, run: Callable[[Any], Any], config_name: str,
                   section: str, prog: str) -> None:
    """Hydra entry (conf/<config_name>.yaml, `run(config_cls(**resolved[section]))`, the section's `advanced:`
    block folded in), or argparse with `--plain` or without Hydra installed (a flag for every field of the flat
    dataclass). Both save the resolved config into `<output>/config.yaml`."""
    from common.advanced import merge_advanced
    from common.files import atomic_write_text

    argv = sys.argv[1:] if argv is None else argv
    if "--plain" in argv or not has_hydra():
        setup_logging()
        cfg = plain_config(config_cls, argv, prog, section)
        atomic_write_text(Path(cfg.output) / "config.yaml", config_yaml({section: dataclasses.asdict(cfg)}))
        run(cfg)
        return

    def from_resolved(resolved: dict[str, Any]) -> None:
        atomic_write_text(Path(resolved[section]["output"]) / "config.yaml", config_yaml(resolved))
        run(config_cls(**merge_advanced(resolved[section], section)))

    sys.argv = [sys.argv[0], *argv]
    hydra_entry(config_name, from_resolved)()


def dataclass_command(config_cls: type, run: Callable[[Any], Any], config_name: str, section: str, module: str):
    """(plain_args, main) of a command whose config is a dataclass: `plain_args(argv)` parses `--field value`,
    `main(argv=None)` is `plain_or_hydra` (the evaluation commands: they also run on machines without Hydra)."""
    prog = f"python -m {module} --plain"

    def plain_args(argv: list[str]) -> Any:
        return plain_config(config_cls, argv, prog, section)

    def main(argv: list[str] | None = None) -> None:
        plain_or_hydra(argv, config_cls, run, config_name, section, prog)

    return plain_args, main
