"""The Hydra entry of every command, and the one preset rule.

    main = hydra_entry("sample", run_stage1)      # conf/sample.yaml; run(resolved config dict)

Presets: `+preset=NAME` composes `conf/preset/NAME.yaml` (each starts with `# @package _global_`, so it may set
any group) over the command's config; command-line overrides are applied after it and win. That is Hydra's own
rule; there is no second mechanism.

Machines without Hydra (a bare GPU image): `plain_entry` parses `--field value` for every field of a dataclass
config instead (`--plain`, or automatically when Hydra is not importable).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from common.logs import setup_logging


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
    """A `main()` that composes conf/<config_name>.yaml with the command line and calls `run(resolved dict)`."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name=config_name)
    def main(cfg: DictConfig) -> None:
        setup_logging()
        run(OmegaConf.to_container(cfg, resolve=True))

    return main


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


def plain_config(config_cls: type, argv: list[str], prog: str) -> Any:
    """`config_cls` from `--field value` arguments (see `plain_parser`)."""
    args = vars(plain_parser(config_cls, prog).parse_args(argv))
    return config_cls(**{k: v for k, v in args.items() if v is not None and k != "plain"})


def plain_or_hydra(argv: list[str] | None, config_cls: type, run: Callable[[Any], Any], config_name: str,
                   section: str, prog: str) -> None:
    """Hydra entry (conf/<config_name>.yaml, `run(config_cls(**resolved[section]))`), or argparse with `--plain`
    or without Hydra installed. Both save the resolved config into `<out>/config.yaml`."""
    from common.files import atomic_write_text

    argv = sys.argv[1:] if argv is None else argv
    if "--plain" in argv or not has_hydra():
        setup_logging()
        cfg = plain_config(config_cls, argv, prog)
        atomic_write_text(Path(cfg.out) / "config.yaml", config_yaml({section: dataclasses.asdict(cfg)}))
        run(cfg)
        return

    def from_resolved(resolved: dict[str, Any]) -> None:
        atomic_write_text(Path(resolved[section]["out"]) / "config.yaml", config_yaml(resolved))
        run(config_cls(**resolved[section]))

    sys.argv = [sys.argv[0], *argv]
    hydra_entry(config_name, from_resolved)()


def dataclass_command(config_cls: type, run: Callable[[Any], Any], config_name: str, section: str, module: str):
    """(plain_args, main) of a command whose config is a dataclass: `plain_args(argv)` parses `--field value`,
    `main(argv=None)` is `plain_or_hydra` (the evaluation commands: they also run on machines without Hydra)."""
    prog = f"python -m {module} --plain"

    def plain_args(argv: list[str]) -> Any:
        return plain_config(config_cls, argv, prog)

    def main(argv: list[str] | None = None) -> None:
        plain_or_hydra(argv, config_cls, run, config_name, section, prog)

    return plain_args, main
