#!/usr/bin/env python3
"""Offline install of a serving engine (SGLang, vLLM): one site folder for PYTHONPATH, built from PyPI wheels for
another machine's python and torch (a GPU machine without a package index), packed as one tar.xz.

    python scripts/engine_site.py sglang==0.5.15 --python 3.12 --torch 2.11.0 --present freeze.txt --out OUT
    python scripts/engine_site.py vllm==0.26.0 --python 3.12 --torch 2.11.0 --present freeze.txt --out OUT --split 48M
    python scripts/engine_site.py sglang==0.5.15 sglang-kernel==0.4.4 ...     (more pins: resolved with the engine)

`--present`: what the target machine already has, as `name==version` lines (`python -m pip freeze` there); torch
(`--torch`) always counts as present. Needs pip >= 23 (`--dry-run --report`) here, tar and xz; nothing is built from
source. Output in OUT: `ENGINE-VERSION-pyXY-torchT-site.tar.xz` (or its `.partNN` pieces of `--split` bytes), its
`.sha256`, the wheels under `wheels/` and the unpacked `site/` (`--clean` deletes both). On the target:

    mkdir site && cat ENGINE-...-site.tar.xz.part* > s.tar.xz && sha256sum -c ENGINE-...-site.tar.xz.sha256
    tar -xJf s.tar.xz -C site && PYTHONPATH=$PWD/site python -m sglang.launch_server --model-path ... FLAGS

where FLAGS are the server flags the drops call for (printed at the end, and in site/ENGINE_SITE.json beside what
the site holds, what was present, what was dropped and why).

How it works:
1. Resolve with pip's own resolver for the target (`pip install --dry-run --report --only-binary=:all:
   --python-version X --platform manylinux_2_N_x86_64 ...`): the engine pin and any more pins, with every present
   package given as a constraint at its present version (a local label such as +cu130 stripped). A present package
   the engine needs at another version (SGLang 0.5.15 pins transformers==5.12.1; a torch 2.11 image may have 5.17)
   makes pip report the conflict; its constraint is lifted, it is resolved again and comes with the site (the site
   is first on PYTHONPATH, so it shadows the machine's copy). torch is never lifted: an engine that pins another
   torch stops the script with pip's message.
2. Select: the packages reachable from the engine (Requires-Dist, environment markers evaluated for the target,
   the engine's own extras skipped, a dependency's requested extras followed), not traversing packages present at
   the resolved version (their own dependencies came with them) nor the engine's drop list below; what is reachable
   only through a dropped package is dropped with it.
3. Download the selected wheels (`pip download --no-deps`), install them (`pip install --no-deps --target`), delete
   the engine's file drops, write site/ENGINE_SITE.json.
4. Pack: `tar | xz -T0`, optionally split; sha256 of the whole archive.

What a dense model on Hopper never loads, and so is dropped (`--keep NAME` keeps one; the reasons are in DROPS,
per engine; each is imported only for another model family, GPU generation or option):

SGLang 0.5.15 (read in its wheel; an AST walk of the modules the server imports for a Llama-type target with an
EAGLE-3 draft, from sglang.launch_server down to models/llama_eagle3.py, speculative/eagle_worker_v2.py and
layers/attention/triton_backend.py, finds none of the dropped packages imported at module level outside a check
that is false there; and the site imports those modules under python 3.12 with torch 2.11.0 on a machine without a
GPU, which is what catches an import of an undeclared package such as dill):
- flashinfer-cubin (447 MB): FlashInfer's prebuilt kernels, an optional dependency of FlashInfer, which
  JIT-compiles what it needs with the machine's nvcc instead.
- sgl_kernel/flash_ops.abi3.so (FlashAttention-3 builds, 1.76 GB of sglang-kernel's 1.81 GB unpacked): the fa3
  attention backend, SGLang's default on Hopper, loaded only by that backend (jit_kernel/flash_attention_v3.py,
  layers/attention/flashattention_backend.py). Without it: `--attention-backend triton --sampling-backend pytorch`
  (FLAGS). `--keep flash_ops` keeps it, and the defaults then work.
- sgl_kernel/sm100: sgl_kernel's loader (load_utils.py) takes sm90/common_ops on compute capability 9.0 and sm100/
  for EVERY other GPU, so without it the site serves on Hopper only (`--keep sm100` for A100, L40, Blackwell).
- packages: MLA / DeepSeek / FP8 kernels (tokenspeed-mla, sgl-deep-gemm, tilelang), FlashAttention-4 (flash-attn-4),
  audio/video/vision front ends (torchaudio, torchcodec, timm), ModelScope downloads, the benchmarks' datasets,
  py-spy, the llguidance grammar backend, MathDx headers (MoE load balancer), the cuTile compiler and CUDA 13.2's
  nvcc (FlashInfer's and SGLang's JIT take the machine's toolkit). Kept although one might expect otherwise:
  ipython and soundfile (sglang/utils.py and the OpenAI realtime/ASR routes import them at module level) and dill
  (DROPS' `undeclared`: sglang imports it, only datasets declares it).

Measured (2026-12-07, this script, sglang 0.5.15 for python 3.12 and torch 2.11.0, the present list being torch
2.11.0 + transformers 5.17.0 + numpy with their dependencies, i.e. a CUDA torch image): 118 packages, 1.09 GB of
wheels, 3.0 GB installed, 1.22 GB after the file drops, one tar.xz of 276 MB (--split 48M: five 48 MB parts and one
of 36 MB); ~25 min on 2 busy cores, most of it xz. transformers, tokenizers, numpy and cuda-bindings come with the
site at the versions SGLang's pins resolve to (5.12.1, 0.22.2, 2.3.5, 13.4.4).

Findings (PyPI, 2026-12): sglang 0.5.15 ships one wheel per CPython, cp310 to cp313, every one tagged
manylinux_2_34_x86_64 (glibc >= 2.34: Ubuntu 22.04+, RHEL 9+); for python 3.12 pip serves
sglang-0.5.15-cp312-cp312-manylinux_2_34_x86_64.whl (12.8 MB), and without manylinux_2_34 among the platforms it
finds no 0.5.15 at all (its newest is then 0.5.10.post1), hence `--glibc 2.34` by default. Its Requires-Dist pins
torch==2.11.0 (0.5.20 pins 2.13.0, 0.5.23 2.14.1), sglang-kernel==0.4.4, flashinfer_python[cu13]==0.6.12,
flashinfer_cubin==0.6.12, transformers==5.12.1, torchao==0.17.0, torchaudio==2.11.0.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement

MANIFEST = "ENGINE_SITE.json"


@dataclass
class Drops:
    """Per engine: whole packages not downloaded ({name: reason}), files deleted after install ({key: (globs,
    reason)}), the server flags that the default drops call for, and packages the engine imports without declaring
    them ({name: where}: kept although only a dropped package requires them)."""
    packages: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    flags_unless_kept: str | None = None   # the file-drop key whose removal makes `flags` necessary
    undeclared: dict[str, str] = field(default_factory=dict)


DROPS = {
    "sglang": Drops(
        packages={
            "flashinfer-cubin": "FlashInfer's prebuilt kernels (447 MB); FlashInfer JIT-compiles what it needs with "
                                "the machine's nvcc",
            "tokenspeed-mla": "MLA attention kernels for Blackwell (DeepSeek-style models); brings "
                              "tokenspeed-triton, a second triton",
            "sgl-deep-gemm": "DeepGEMM FP8 GEMMs (FP8 block-quantised MoE / DeepSeek models)",
            "tilelang": "TileLang kernels (DeepSeek sparse attention indexer, some quantised paths); brings z3-solver",
            "flash-attn-4": "FlashAttention-4 (CuTe DSL) for the fa4 attention backend, a Blackwell backend",
            "torchaudio": "audio front ends of multimodal models",
            "torchcodec": "video/audio decoding of multimodal models",
            "timm": "vision towers of multimodal models",
            "modelscope": "downloads from ModelScope (SGLANG_USE_MODELSCOPE); models are local folders here",
            "datasets": "benchmark scripts (bench_serving); brings pyarrow and pandas",
            "py-spy": "a sampling profiler binary (debug dumps)",
            "llguidance": "the llguidance grammar backend (xgrammar, the default one, stays)",
            "nvidia-mathdx": "MathDx headers for the JIT kernels of SGLang's MoE expert load balancer (lplb)",
            "nvidia-cuda-tileiras": "the cuTile compiler: FlashInfer compiles cuTile kernels only for "
                                    "all_gather_matmul on SM >= 100 (cuda-tile stays: flashinfer.comm imports it)",
            "nvidia-cuda-nvcc": "CUDA 13.2's nvcc, for the cuTile compiler; FlashInfer's and SGLang's JIT kernels "
                                "(flashinfer/jit/cpp_ext.py, tvm_ffi/cpp/extension.py) take $CUDA_HOME's or PATH's "
                                "nvcc, the machine's toolkit (--keep it where there is none: "
                                "CUDA_HOME=site/nvidia/cu13)",
        },
        files={
            "flash_ops": (("sgl_kernel/flash_ops*.so",),
                          "FlashAttention-3 builds (the fa3 attention backend; 1.76 GB of sglang-kernel's 1.81 GB "
                          "unpacked); serve with --attention-backend triton --sampling-backend pytorch"),
            "sm100": (("sgl_kernel/sm100",), "sgl_kernel's builds for every GPU but compute capability 9.0 "
                                             "(load_utils.py takes sm90/ on Hopper): the site serves on Hopper only"),
        },
        flags=["--attention-backend", "triton", "--sampling-backend", "pytorch"],
        flags_unless_kept="flash_ops",
        undeclared={"dill": "sglang/srt/sampling/custom_logit_processor.py imports it at module level (on the "
                            "server's import path); only datasets declares it"},
    ),
    # The drops seen serving a dense model with EAGLE-3 on an H200 with vLLM 0.26 (FLASH_ATTN backend = FA3).
    "vllm": Drops(
        packages={
            "flashinfer-python": "FlashInfer sampler and attention backends; vLLM's FLASH_ATTN backend (FA3) serves "
                                 "Hopper; set VLLM_USE_FLASHINFER_SAMPLER=0",
            "flashinfer-cubin": "FlashInfer's prebuilt kernels",
        },
        files={
            "fa2": (("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",), "FlashAttention-2 kernels (Hopper runs FA3)"),
            "vllm-rs": (("vllm/vllm-rs",), "the Rust front end"),
            "flashmla": (("vllm/_flashmla_C.abi3.so",), "FlashMLA (MLA models)"),
            "qutlass": (("vllm/_qutlass_C.abi3.so",), "QuTLASS (FP4 quantisation on Blackwell)"),
            "sm100": (("vllm/third_party/fmha_sm100",), "Blackwell attention"),
            "deep_gemm_include": (("vllm/third_party/deep_gemm/include",), "DeepGEMM's CUTLASS headers (FP8 MoE JIT)"),
            "other_pythons": (("vllm/third_party/**/_C.cpython-3[01345]*",), "extension builds for other pythons"),
        },
    ),
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_version(version: str) -> str:
    return version.split("+", 1)[0]


def platform_args(python: str, glibc: str) -> list[str]:
    """pip's target flags: wheels only, CPython `python`, every manylinux tag up to glibc `glibc` on x86_64."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 5:
        raise SystemExit(f"--glibc {glibc}: expected 2.N with N >= 5")
    tags = [f"manylinux_2_{n}_x86_64" for n in range(minor, 4, -1)]
    tags += [t for n, t in ((17, "manylinux2014_x86_64"), (12, "manylinux2010_x86_64"), (5, "manylinux1_x86_64"))
             if minor >= n]
    out = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for t in tags + ["any"]:
        out += ["--platform", t]
    return out


def marker_env(python: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "implementation_version": f"{python}.0"}


def read_present(paths: list[Path], torch: str) -> dict[str, str]:
    """{normalized name: version} from `name==version` lines (pip freeze); other lines (editables, `name @ url`)
    are reported and skipped. torch is set to `torch`."""
    present: dict[str, str] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*(\S+)", line)
            if m:
                present[normalize(m.group(1))] = m.group(2)
            else:
                print(f"  present list: skipped {line!r} (not name==version)", file=sys.stderr)
    present["torch"] = torch
    return present


def pip(args: list[str], pip_cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(pip_cmd + args, capture_output=True, text=True)


def resolve(reqs: list[str], present: dict[str, str], plat: list[str], work: Path, pip_cmd: list[str],
            fixed: set[str]) -> tuple[list[dict], list[str]]:
    """pip's resolution of `reqs` for the target, present packages pinned as constraints; a constraint pip names in a
    conflict is lifted (never one in `fixed`). Returns (the report's install list, the lifted names)."""
    lifted: list[str] = []
    while True:
        constraints = work / "present-constraints.txt"
        constraints.write_text("".join(f"{n}=={base_version(v)}\n" for n, v in sorted(present.items())
                                       if n not in lifted))
        report = work / "resolution.json"
        print(f"resolving {' '.join(reqs)} ({len(present) - len(lifted)} present packages as constraints)")
        r = pip(["install", "--dry-run", "--ignore-installed", "--report", str(report), "--target",
                 str(work / "dry-run-target"), "-c", str(constraints), *plat, *reqs], pip_cmd)
        if r.returncode == 0:
            return json.loads(report.read_text())["install"], lifted
        said = r.stdout + r.stderr   # pip prints the conflict's explanation on stdout, the error on stderr
        named = {normalize(n) for n in re.findall(r"\(constraint\) ([A-Za-z0-9][A-Za-z0-9._-]*)==", said)}
        stuck = named & fixed
        new = sorted(named - fixed - set(lifted))
        if stuck or not new:
            tail = "\n".join(line for line in said.splitlines() if line.startswith(("ERROR", " ", "The ")))
            raise SystemExit(f"pip cannot resolve {' '.join(reqs)} for the target"
                             + (f" with {', '.join(f'{n}=={present[n]}' for n in sorted(stuck))} fixed" if stuck
                                else "") + f":\n{tail[-4000:]}")
        for n in new:
            print(f"  present {n}=={present[n]} conflicts with the engine's pins: it comes with the site instead")
        lifted += new


def select(install: list[dict], roots: list[str], present: dict[str, str], drops: dict[str, str], python: str
           ) -> tuple[dict[str, dict], dict[str, str], dict[str, str]]:
    """(selected {name: report entry}, present at the resolved version {name: version}, dropped {name: reason}).
    `roots`: requirement strings or names (an engine's undeclared imports are roots too)."""
    index = {normalize(p["metadata"]["name"]): p for p in install}
    env = marker_env(python)

    def deps(name: str, extras: frozenset[str]) -> list[tuple[str, frozenset[str]]]:
        out = []
        for spec in index[name]["metadata"].get("requires_dist") or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                out.append((normalize(req.name), frozenset(req.extras)))
        return out

    selected: dict[str, dict] = {}
    kept_present: dict[str, str] = {}
    dropped: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(normalize(Requirement(r).name), frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or name not in index:
            continue
        seen.add((name, extras))
        version = index[name]["metadata"]["version"]
        if name in drops:
            dropped[name] = drops[name]
            continue
        if name in present and base_version(present[name]) == base_version(version):
            kept_present[name] = present[name]
            continue
        selected[name] = index[name]
        todo += deps(name, extras)
    # what only the dropped packages needed: reachable when drops are followed, neither selected nor present
    reach, todo = set(), [(d, frozenset()) for d in dropped]
    while todo:
        name, extras = todo.pop()
        if name in reach or name not in index or name in present:
            continue
        reach.add(name)
        todo += deps(name, extras)
    for name in sorted(reach - set(selected) - set(dropped)):
        by = sorted(d for d in dropped if name in _closure(d, deps, index))
        dropped[name] = f"needed only by {', '.join(by)}"
    return selected, kept_present, dropped


def _closure(root: str, deps, index) -> set[str]:
    out, todo = set(), [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        if name in out or name not in index:
            continue
        out.add(name)
        todo += deps(name, extras)
    return out


def tree_size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def drop_files(site: Path, files: dict[str, tuple[tuple[str, ...], str]], keep: set[str]) -> dict[str, dict]:
    """Delete each file drop's globs (relative to the site) unless its key is kept; {key: {paths, bytes, reason}}."""
    done = {}
    for key, (globs, reason) in files.items():
        if key in keep:
            continue
        paths = sorted({p for g in globs for p in site.glob(g)}, key=lambda p: len(p.parts))
        freed, removed = 0, []
        for p in paths:
            if not p.exists():
                continue   # inside a folder removed already
            freed += tree_size(p)
            removed.append(str(p.relative_to(site)))
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if removed:
            done[key] = {"paths": removed, "bytes": freed, "reason": reason}
    return done


def pack(site: Path, archive: Path, level: int, split: int | None) -> list[Path]:
    """site -> archive (tar | xz -T0); split into archive.partNN when `split` bytes are given; archive.sha256."""
    with open(archive, "wb") as f:
        tar = subprocess.Popen(["tar", "-C", str(site), "-cf", "-", "."], stdout=subprocess.PIPE)
        xz = subprocess.run(["xz", "-T0", f"-{level}", "-c"], stdin=tar.stdout, stdout=f)
        tar.stdout.close()
        if tar.wait() or xz.returncode:
            raise SystemExit("tar | xz failed")
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    (archive.parent / (archive.name + ".sha256")).write_text(f"{digest.hexdigest()}  {archive.name}\n")
    if not split or archive.stat().st_size <= split:
        return [archive]
    parts = []
    with open(archive, "rb") as f:
        while chunk := f.read(split):
            parts.append(archive.parent / f"{archive.name}.part{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    archive.unlink()
    return parts


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)B?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 48M, 2G, 1000000")
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)])


def mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reqs", nargs="+", help="the engine pin (sglang==X or vllm==X) first, then more pins")
    ap.add_argument("--python", required=True, help="the target's python, e.g. 3.12")
    ap.add_argument("--torch", required=True, help="the target's torch, e.g. 2.11.0 (never replaced)")
    ap.add_argument("--present", type=Path, action="append", default=[],
                    help="name==version lines of what the target has (pip freeze there); repeatable")
    ap.add_argument("--glibc", default="2.34", help="the target's glibc: manylinux tags up to it (default 2.34)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (archive, site/, wheels/)")
    ap.add_argument("--split", type=parse_size, help="split the archive into parts of this size, e.g. 48M")
    ap.add_argument("--keep", action="append", default=[], help="keep a dropped package or file-drop key")
    ap.add_argument("--xz-level", type=int, default=6)
    ap.add_argument("--clean", action="store_true", help="delete site/ and wheels/ once packed")
    ap.add_argument("--dry-run", action="store_true", help="resolve and list what the site would hold; no download")
    ap.add_argument("--pip", default=f"{sys.executable} -m pip", help="the pip to run (default: this python's)")
    args = ap.parse_args(argv)

    engine_req = Requirement(args.reqs[0])
    engine = normalize(engine_req.name)
    if engine not in DROPS:
        raise SystemExit(f"unknown engine {engine_req.name!r}; known: {', '.join(DROPS)}")
    drops = DROPS[engine]
    keep = {normalize(k) for k in args.keep} | set(args.keep)
    pip_cmd = args.pip.split()
    plat = platform_args(args.python, args.glibc)
    out = args.out.resolve()
    work, site, wheels = out / "work", out / "site", out / "wheels"
    for d in (work, site):
        shutil.rmtree(d, ignore_errors=True)
    for d in (work, wheels):
        d.mkdir(parents=True, exist_ok=True)

    present = read_present(args.present, args.torch)
    install, lifted = resolve(args.reqs, present, plat, work, pip_cmd, fixed={"torch"})
    index = {normalize(p["metadata"]["name"]): p for p in install}
    engine_version = index[engine]["metadata"]["version"]
    package_drops = {n: r for n, r in drops.packages.items() if n not in keep}
    roots = args.reqs + [n for n in drops.undeclared if n in index]
    selected, kept_present, dropped = select(install, roots, {n: v for n, v in present.items() if n not in lifted},
                                             package_drops, args.python)

    pins = [f"{index[n]['metadata']['name']}=={index[n]['metadata']['version']}" for n in sorted(selected)]
    if args.dry_run:
        print(f"{engine} {engine_version}: {len(pins)} packages would come with the site: {' '.join(pins)}")
        print(f"  present at the resolved version: {' '.join(f'{n}=={v}' for n, v in sorted(kept_present.items()))}")
        for n in lifted:
            print(f"  replaces present {n} {present[n]} with {index[n]['metadata']['version']}")
        for n, reason in sorted(dropped.items()):
            print(f"  dropped {n} {index[n]['metadata']['version']}: {reason}")
        shutil.rmtree(work, ignore_errors=True)
        return
    print(f"downloading {len(pins)} wheels into {wheels}")
    for f in wheels.glob("*.whl"):   # a wheel left from an earlier run that is no longer selected
        if normalize(f.name.split("-")[0]) not in selected:
            f.unlink()
    r = pip(["download", "--no-deps", "-d", str(wheels), *plat, *pins], pip_cmd)
    if r.returncode:
        raise SystemExit(f"pip download failed:\n{r.stderr[-4000:]}")
    files = sorted(wheels.glob("*.whl"))
    wheel_bytes = {normalize(f.name.split("-")[0]): f.stat().st_size for f in files}
    print(f"installing into {site}")
    r = pip(["install", "--no-deps", "--no-compile", "--target", str(site), *plat, *map(str, files)], pip_cmd)
    if r.returncode:
        raise SystemExit(f"pip install --target failed:\n{r.stderr[-4000:]}")
    before = tree_size(site)
    removed = drop_files(site, drops.files, keep)
    flags = drops.flags if drops.flags_unless_kept in removed else []

    manifest = {
        "engine": engine, "version": engine_version, "python": args.python, "torch": args.torch,
        "glibc": args.glibc, "requested": args.reqs,
        "packages": {index[n]["metadata"]["name"]: index[n]["metadata"]["version"] for n in sorted(selected)},
        "present": dict(sorted(kept_present.items())),
        "replaced_present": {n: {"present": present[n], "site": index[n]["metadata"]["version"]}
                             for n in lifted if n in index},
        "dropped_packages": dict(sorted(dropped.items())),
        "undeclared_kept": {n: why for n, why in drops.undeclared.items() if n in selected},
        "dropped_files": removed,
        "server_flags": flags,
        "site_bytes": tree_size(site),
    }
    (site / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    tag = f"{engine}-{engine_version}-py{args.python.replace('.', '')}-torch{args.torch}-site.tar.xz"
    for old in out.glob(tag + "*"):
        old.unlink()
    print(f"packing {tag} (xz -{args.xz_level})")
    parts = pack(site, out / tag, args.xz_level, args.split)

    print(f"\n{engine} {engine_version} for python {args.python}, torch {args.torch}, glibc >= {args.glibc}")
    print(f"  site: {len(selected)} packages, wheels {mb(sum(wheel_bytes.values()))}, unpacked {mb(before)} "
          f"-> {mb(manifest['site_bytes'])} after the file drops")
    big = sorted(wheel_bytes.items(), key=lambda kv: -kv[1])[:8]
    print("  largest wheels: " + ", ".join(f"{n} {mb(b)}" for n, b in big))
    for n, v in manifest["replaced_present"].items():
        print(f"  replaces present {n} {v['present']} with {v['site']}")
    print(f"  present, not included: {len(kept_present)} packages ({', '.join(sorted(kept_present)[:12])}"
          f"{', ...' if len(kept_present) > 12 else ''})")
    for n, reason in manifest["dropped_packages"].items():
        print(f"  dropped {n} {index[n]['metadata']['version']}: {reason}")
    for n, why in manifest["undeclared_kept"].items():
        print(f"  kept {n} (not declared by {engine}): {why}")
    for key, d in removed.items():
        print(f"  dropped files {key} ({mb(d['bytes'])}): {d['reason']}")
    print("  archive: " + ", ".join(f"{p.name} {mb(p.stat().st_size)}" for p in parts)
          + f" (total {mb(sum(p.stat().st_size for p in parts))}); sha256 in {tag}.sha256")
    if flags:
        print(f"  serve with: {' '.join(flags)}")
    shutil.rmtree(work, ignore_errors=True)
    if args.clean:
        shutil.rmtree(site, ignore_errors=True)
        shutil.rmtree(wheels, ignore_errors=True)


if __name__ == "__main__":
    main()
