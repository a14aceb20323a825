"""What a command line may say, checked before Hydra runs the command (`common.entry.hydra_entry` calls this).

    python -m stage1_sample sample.num_prompt=16       -> no setting sample.num_prompt ...; did you mean sample.num_prompts?
    python -m stage3_train +preset=demo_sample         -> stage3_train does not read the section `sample` ...
    python -m stage1_sample sample.output_dir=out       -> sample.output_dir is now sample.output ...

The command line is composed once the way Hydra will compose it (`--cfg job` included). A mistyped key is named
with the closest key the command has (Hydra alone advises `+KEY=...`, which adds a setting nothing reads); a
top-level section the command's own config (`conf/<name>.yaml` and its groups) does not have, which a preset for
another stage or a `+section.key=...` brings in, is refused, naming the presets written for this command. A key
that was renamed (RENAMED) or moved into its section's `advanced:` block (common/advanced.py) is refused naming
its new name, whether the command line or a preset sets it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.advanced import ADVANCED

# Hydra switches after which the command does not run, or is composed from other files: nothing to check
NOT_CHECKED = ("help", "hydra_help", "info", "shell_completion", "multirun", "config_path", "config_name",
               "config_dir", "experimental_rerun")


# settings renamed so that one idea has one name in every config (old key -> new key); the old key is refused
RENAMED = {
    # the input / output folders: sample.input -> sample.output -> hidden.input -> hidden.output -> train.input ...
    "sample.output_dir": "sample.output",
    "hidden.limit": "hidden.num_prompts",       # first N input records: as sample.num_prompts, eval's and bench's
    "train.data": "train.input",
    "train.out": "train.output",
    "eval.out": "eval.output",
    "bench.out": "bench.output",
    "eval.chain_k": "eval.num_speculative_tokens",           # draft tokens per step: bench.num_speculative_tokens
}


class CommandLineError(ValueError):
    """A command line that names a setting or section the command does not have (one line, for the user)."""


@dataclass
class Composed:
    """What the run will write to, from the command line's config as Hydra will compose it."""
    run_dir: Path | None  # hydra.run.dir (the output folder the run's log goes to); None when it does not resolve
    job_log: str | None   # the name of Hydra's log in it (<hydra.job.name>.log); None when the config names no job


def check_command_line(conf_dir: Path, config_name: str, argv: list[str], command: str) -> Composed | None:
    """Compose conf/<config_name>.yaml with `argv`'s overrides; raise `CommandLineError` for a key the config does
    not have or a section the command does not read. None when the line is not composed here (`--help`,
    `--multirun`, another config, or an error Hydra reports itself: a missing group option, bad syntax)."""
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, name, None) for name in NOT_CHECKED):
        return None
    base = compose(conf_dir, config_name, [])
    try:
        cfg = compose(conf_dir, config_name, args.overrides, with_hydra=True)
    except HydraException as e:  # a composition error; Hydra reports the others (a missing option, bad syntax) itself
        if isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError)):
            raise CommandLineError(unknown_key_message(e.__cause__.full_key, args.overrides, base, config_name)) \
                from e
        return None
    unread = sorted(set(cfg) - {"hydra"} - set(base))
    if unread:
        raise CommandLineError(unread_sections_message(unread, args.overrides, set(base), conf_dir, command))
    known = set(dotted_keys(base))
    stale = [key for key in dotted_keys(cfg, skip=("hydra",)) if key not in known and new_name(key, known)]
    if stale:  # brought in by `+KEY=...` or a preset
        raise CommandLineError(renamed_message(stale[0], new_name(stale[0], known), config_name))
    job_name = cfg.hydra.job.name
    return Composed(run_dir_of(cfg), f"{job_name}.log" if job_name else None)


def compose(conf_dir: Path, config_name: str, overrides: list[str], with_hydra: bool = False) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=with_hydra)


def run_dir_of(cfg: Any) -> Path | None:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    except OmegaConfBaseException:  # an interpolation only Hydra's run resolves
        return None
    return Path(run_dir) if run_dir else None


def unknown_key_message(full_key: str, overrides: list[str], base: Any, config_name: str) -> str:
    """`no setting KEY in conf/NAME.yaml; did you mean CLOSEST?` for the override whose key Hydra refused."""
    typed = overridden_key(full_key, overrides)
    known = dotted_keys(base)
    renamed = new_name(typed, set(known))
    if renamed:
        return renamed_message(typed, renamed, config_name)
    close = difflib.get_close_matches(typed, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"the settings are listed in conf/{config_name}.yaml"
    return f"no setting {typed} in conf/{config_name}.yaml; {hint}"


def new_name(key: str, known: set[str]) -> str | None:
    """The current name of `key` when it was renamed (RENAMED) or moved into its section's `advanced:` block
    (`sample.rows_per_shard` -> `sample.advanced.rows_per_shard`, also below a renamed or moved key); else None."""
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    section, _, rest = key.partition(".")
    moved = f"{section}.{ADVANCED}.{rest}"
    return moved if rest and moved in known else None


def renamed_message(key: str, new: str, config_name: str) -> str:
    return f"{key} is now {new} (conf/{config_name}.yaml)"


def overridden_key(full_key: str, overrides: list[str]) -> str:
    """The key as the user typed it (`sampel.num_prompts`) from the part OmegaConf refused (`sampel`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key == full_key or key.startswith(full_key + "."):
            return key
    return full_key


def dotted_keys(base: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """Every key of a composed config as `section.key.subkey` (sections and nested sections included), but the
    top-level sections in `skip`."""
    from omegaconf import OmegaConf

    def walk(node: dict, prefix: str) -> list[str]:
        keys = []
        for key, value in node.items():
            keys.append(prefix + str(key))
            if isinstance(value, dict):
                keys += walk(value, f"{prefix}{key}.")
        return keys

    tree = OmegaConf.to_container(base, resolve=False)
    return walk({key: value for key, value in tree.items() if key not in skip}, "")


def unread_sections_message(unread: list[str], overrides: list[str], readable: set[str], conf_dir: Path,
                            command: str) -> str:
    """`COMMAND does not read the section `sample` (from +preset=X): ...; presets for COMMAND: a, b`."""
    presets = [o for o in overrides if o.lstrip("+~").startswith("preset=")]
    source = f" (from {' '.join(presets)})" if presets else ""
    names = ", ".join(f"`{s}`" for s in unread)
    return (f"{command} does not read the section{'s' if len(unread) > 1 else ''} {names}{source}: a preset or "
            f"setting for another command; presets for {command}: {', '.join(presets_for(readable, conf_dir))}")


def presets_for(readable: set[str], conf_dir: Path) -> list[str]:
    """The presets (conf/preset/NAME.yaml) that set only sections a command with `readable` sections reads."""
    names = []
    for path in sorted((conf_dir / "preset").glob("*.yaml")):
        sections = set(yaml.safe_load(path.read_text()) or {}) - {"defaults"}
        if sections and sections <= readable:
            names.append(path.stem)
    return names
