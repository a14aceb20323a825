"""scripts/engine_site.py's offline parts: target tags, the present list, and the selection over pip's resolution
(present packages and drops stop the walk, what only a drop needs goes with it, markers and extras as pip reads
them)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("engine_site", Path(__file__).parents[1] / "scripts/engine_site.py")
engine_site = sys.modules.setdefault("engine_site", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(engine_site)


def test_platform_tags_and_present_list(tmp_path):
    args = engine_site.platform_args("3.12", "2.34")
    tags = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert tags[0] == "manylinux_2_34_x86_64" and "manylinux_2_5_x86_64" in tags and "manylinux_2_35_x86_64" not in tags
    assert {"manylinux2014_x86_64", "manylinux1_x86_64", "any"} <= set(tags)
    assert args[args.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in args
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# pip freeze\ntorch==2.10.0+cu130\nTyping_Extensions==4.16.0\n-e git+https://x/y#egg=y\n"
                      "local-pkg @ file:///wheels/local_pkg-1.0-py3-none-any.whl\nnumpy == 2.3.5\n")
    present = engine_site.read_present([freeze], torch="2.11.0")
    assert present == {"torch": "2.11.0", "typing-extensions": "4.16.0", "numpy": "2.3.5"}
    assert engine_site.base_version("2.11.0+cu130") == "2.11.0"
    assert engine_site.parse_size("48M") == 48_000_000


def entry(name, version, *requires):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


def test_select_walks_the_resolution_like_the_target_would():
    install = [
        entry("Engine", "1.0", "a>=1", "b", "drop_me", "c[gpu]", "old; python_version < '3.10'", "opt; extra == 'dev'"),
        entry("a", "1.0", "a-dep"), entry("a-dep", "1.0"),       # present: a's own dependencies are not walked
        entry("b", "2.0", "shared"), entry("shared", "1.0"),
        entry("drop-me", "3.0", "only-dropped", "shared", "undeclared"), entry("only-dropped", "1.0"),
        entry("undeclared", "1.0"),
        entry("c", "1.0", "gpu-dep; extra == 'gpu'", "cpu-dep; extra == 'cpu'"), entry("gpu-dep", "1.0"),
        entry("cpu-dep", "1.0"), entry("old", "1.0"), entry("opt", "1.0"),
        entry("numpy", "2.3.5"),
    ]
    present = {"a": "1.0", "numpy": "2.5.5"}
    selected, kept, dropped = engine_site.select(install, ["engine==1.0", "undeclared"], present,
                                                 {"drop-me": "not needed"}, "3.12")
    assert set(selected) == {"engine", "b", "shared", "c", "gpu-dep", "undeclared"}
    assert kept == {"a": "1.0"}
    assert dropped == {"drop-me": "not needed", "only-dropped": "needed only by drop-me"}
    # a present package at another version than resolved comes with the site (the caller lifts it first)
    selected, kept, _ = engine_site.select(install, ["engine", "numpy"], present, {}, "3.12")
    assert "numpy" in selected and "numpy" not in kept


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_every_engine_has_drops_with_reasons(engine):
    drops = engine_site.DROPS[engine]
    assert all(reason for reason in drops.packages.values())
    assert all(globs and reason for globs, reason in drops.files.values())
