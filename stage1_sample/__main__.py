"""Stage 1 entry point: ``python -m stage1_sample [hydra overrides]`` (``make sample ARGS="..."``).

Composes ``conf/sample.yaml``, refuses an input with no records (unless ``sample.allow_empty``), saves the
resolved config beside the output (secret server flags and environment values redacted), starts the server
(``sample.server.engine``: vLLM, or ``transformers serve``, with the target's tool / reasoning parsers) unless
``sample.server.urls`` points at running servers, regenerates, prints the accounting line (with output tokens/s)
and writes the manifest (with ``throughput`` and ``token_ids`` counts).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from common.entry import config_yaml, hydra_entry
from common.files import atomic_write_text
from common.logs import get_logger
from common.server import (ENGINE_NAMES, cuda_available, free_port, install_signal_handlers, launch,
                           parses_tool_calls, request_model_name, returns_token_ids, sampling_fields, server_command,
                           stop_servers)
from common.target import TargetSpec
from evaluation.holdout import drop_evaluation_prompts

from .client import ChatClient, api_key_from_env
from .config import SampleConfig
from .formats import Conversation, Skipped, open_conversations
from .regenerate import ContextBudget, Tally, run_loop
from .writer import ConversationWriter

log = get_logger("stage1")
# settings that change the answers (the parsers: where reasoning and tool calls are stored): a resumed run must
# use the same ones
RESUME_KEYS = [("target", "name"), ("target", "path"), ("target", "tool_call_parser"), ("target", "reasoning_parser"),
               ("sample", "input"), ("sample", "format"), ("sample", "temperature"), ("sample", "top_p"),
               ("sample", "max_tokens"), ("sample", "max_conversation_tokens"), ("sample", "seed"),
               ("sample", "chat_template_kwargs"), ("sample", "drop_eval_prompts")]
# a config.yaml stored before a setting existed lacks its key: that run behaved as this value (kept eval prompts)
RESUME_DEFAULTS = {("sample", "drop_eval_prompts"): False}
TOOLS_REFUSED = ("has tools, but the launched vLLM has no tool parser (target.tool_call_parser is null), so it "
                 "would answer HTTP 400")


def check_resume(out_dir: Path, resolved: dict[str, Any]) -> None:
    """Refuse to resume a run whose stored config differs in a setting that changes the answers, or whose shards
    may hold records past this run's ``sample.num_prompts`` (a larger value only extends the run: the first N
    records are a prefix of the first M > N)."""
    old_file = out_dir / "config.yaml"
    if not old_file.exists():
        return
    old = yaml.safe_load(old_file.read_text()) or {}

    def stored(a: str, b: str) -> Any:
        return old.get(a, {}).get(b, RESUME_DEFAULTS.get((a, b)))

    diffs = [f"{a}.{b}: {stored(a, b)!r} -> {resolved[a].get(b)!r}"
             for a, b in RESUME_KEYS if stored(a, b) != resolved[a].get(b)]
    old_n, new_n = old.get("sample", {}).get("num_prompts"), resolved["sample"].get("num_prompts")
    if new_n is not None and (old_n is None or new_n < old_n):
        diffs.append(f"sample.num_prompts: {old_n!r} -> {new_n!r} (fewer records than the shards may hold)")
    if diffs:
        raise ValueError(f"{out_dir} holds a run with other settings ({'; '.join(diffs)}); "
                         "use another sample.output or the same settings")


def input_records(cfg: SampleConfig) -> Iterator[Conversation | Skipped] | None:
    """The input's records, or None when it has none (found before a server is started for nothing; a bad input
    raises here). With ``sample.drop_eval_prompts`` a conversation opening on an evaluation prompt is a ``Skipped``;
    the first record is read here, so the evaluation sets load now and a missing one fails before any server."""
    records = open_conversations(cfg.input, limit=cfg.num_prompts)
    if records is None or not cfg.drop_eval_prompts:
        return records
    filtered = drop_evaluation_prompts(records)
    return itertools.chain([next(filtered)], filtered)


def with_concurrency(cfg: SampleConfig) -> SampleConfig:
    """``cfg`` with ``sample.concurrency`` set: as configured, or (null) ``SampleConfig.default_concurrency`` for
    the servers this run talks to (launched here or not; on a CUDA GPU or not)."""
    launches = bool(cfg.server.launch and not cfg.server.urls)
    gpu = launches and cfg.concurrency is None and cuda_available()
    return dataclasses.replace(cfg, concurrency=cfg.default_concurrency(launches, gpu))


def run_stage1(resolved: dict[str, Any]) -> dict[str, Any]:
    """Run stage 1 from a resolved config dict; returns the manifest."""
    cfg = with_concurrency(SampleConfig.from_omegaconf(resolved["sample"]))
    target = TargetSpec.from_mapping(resolved["target"])
    out_dir = Path(cfg.output)
    if cfg.resume:
        check_resume(out_dir, resolved)
    items = input_records(cfg)  # None: no records; a bad input raises here
    out_dir.mkdir(parents=True, exist_ok=True)
    if items is None:
        # an empty input is nearly always a wrong path, split or filter: an empty "success" would hide it
        if not cfg.allow_empty:
            raise ValueError(f"sample.input={cfg.input!r} has no records: nothing to regenerate (check the path or "
                             "split; sample.allow_empty=true accepts an empty run)")
        log.warning("sample.input=%r has no records (sample.allow_empty=true): writing an empty manifest", cfg.input)
    writer = ConversationWriter(out_dir, cfg.format, cfg.rows_per_shard, resume=cfg.resume)
    atomic_write_text(out_dir / "config.yaml", config_yaml(resolved))   # secret flags and env values redacted
    sampling = cfg.sampling_params()
    sampling["chat_template_kwargs"] = {**target.chat_template_kwargs, **cfg.chat_template_kwargs}
    launched = bool(cfg.server.launch and not cfg.server.urls and items is not None)
    budget = None if cfg.max_conversation_tokens is None or items is None else ContextBudget.for_target(
        cfg.max_conversation_tokens, target.path, target.trust_remote_code, sampling["chat_template_kwargs"])
    t0 = time.monotonic()
    try:
        tally = Tally(end=time.monotonic()) if items is None else \
            regenerate_all(items, cfg, target, writer, sampling, launched, budget)
    except BaseException:
        writer.close()  # leave the partial shard for sample.resume=true
        raise
    manifest = writer.finish(
        {
            "target": {"name": target.name, "path": target.path, "served_name": target.served_name},
            "input": cfg.input,
            "sampling": sampling,
            "shard_format": cfg.format,
            "server": {"engine": cfg.server.engine, "launched": launched, "concurrency": cfg.concurrency},
            "elapsed_s": round(time.monotonic() - t0, 1),
            "throughput": tally.throughput(),  # this pass, server start-up excluded
            # sample.max_conversation_tokens: the limit and how many conversations of this pass ended at it
            "max_conversation_tokens": cfg.max_conversation_tokens,
            "num_cut": budget.num_cut if budget is not None else 0,
        },
        tally.accounting(),
    )
    print(tally.line(), flush=True)
    if budget is not None:
        print(f"{budget.num_cut} conversations ended at sample.max_conversation_tokens={budget.max_tokens}", flush=True)
    counts = manifest["token_ids"]
    print(f"token ids: {counts['with_server_ids']} conversations with the server's ids, "
          f"{counts['without_server_ids']} without (stage 2 re-tokenises their text)", flush=True)
    print(f"wrote {manifest['num_rows']} conversations in {len(manifest['shards'])} shard(s) to {out_dir}", flush=True)
    return manifest


def stage1_server(cfg: SampleConfig, target: TargetSpec, port: int, log_file: Path, extra_args: list[str] = (),
                  env: dict[str, str] | None = None):
    """One server ``sample.server.launch=true`` starts (not yet started): the engine's command for the target
    (its parsers, dtype, length, vLLM's GPU share and batch bound, ``cb_*`` bounds) plus ``sample.server.extra_args``; ``env`` over
    ``sample.server.env``."""
    cmd = server_command(cfg.server.engine, target.path, target.served_name, port, dtype=target.dtype,
                         max_model_len=cfg.server.max_model_len or target.max_model_len,
                         trust_remote_code=target.trust_remote_code, tool_call_parser=target.tool_call_parser,
                         reasoning_parser=target.reasoning_parser, extra_args=[*cfg.server.extra_args, *extra_args],
                         cb=cfg.cb_bounds(), vllm_gpu=cfg.vllm_gpu_settings())
    return launch(cfg.server.engine, cmd, port=port, env={**(env or {}), **cfg.server.env}, log_file=log_file,
                  startup_timeout=cfg.server.startup_timeout)


def launch_replicas(cfg: SampleConfig, target: TargetSpec, log_dir: Path, stack: contextlib.ExitStack,
                    extra_args: list[str] = ()) -> list:
    """Start ``sample.server.replicas`` servers together (their start-ups overlap), each stopped by ``stack`` (exit,
    error, Ctrl-C); return them once all are healthy. Logs: ``server.log``, or ``server-<i>.log`` for several.
    Several share the host's cores: each gets ``OMP_NUM_THREADS`` = cores / replicas unless the environment or
    ``sample.server.env`` sets it (N processes x all cores of OpenMP threads oversubscribe the host)."""
    n = cfg.server.replicas
    env = {}
    if n > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    servers: list = []
    stack.callback(stop_servers, servers)  # before any start: a failed start-up still stops the whole group, and
    for i in range(n):                     # all of them together (SIGTERM to each, one deadline)
        port = cfg.server.port + i if cfg.server.port else free_port()
        server = stage1_server(cfg, target, port, log_dir / ("server.log" if n == 1 else f"server-{i}.log"),
                               extra_args, env)
        servers.append(server)
        server.start()
    log.info("starting %d x %s for %s (logs in %s)", n, ENGINE_NAMES[cfg.server.engine], target.path, log_dir)
    for server in servers:
        server.wait_healthy()
    return servers


def regenerate_all(items: Iterator[Conversation | Skipped], cfg: SampleConfig, target: TargetSpec,
                   writer: ConversationWriter, sampling: dict[str, Any], launch_server: bool,
                   budget: ContextBudget | None = None) -> Tally:
    """Regenerate ``items`` through ``sample.server.urls``, or through the servers started for this (and stopped)."""
    engine = cfg.server.engine
    urls, tools_refused = cfg.server.urls, None  # a server we did not start is trusted to take tools
    with contextlib.ExitStack() as stack:
        if launch_server:
            servers = launch_replicas(cfg, target, writer.dir, stack)
            if engine == "vllm" and not parses_tool_calls(servers[0].cmd):
                tools_refused = TOOLS_REFUSED
            urls = [server.url for server in servers]
        model_name = request_model_name(engine, target.path, target.served_name)
        return asyncio.run(_sample(items, urls, model_name, cfg, writer, sampling, tools_refused, budget))


async def _sample(items: Any, urls: list[str], model: str, cfg: SampleConfig, writer: ConversationWriter,
                  sampling: dict[str, Any], tools_refused: str | None, budget: ContextBudget | None) -> Tally:
    engine = cfg.server.engine
    async with ChatClient(urls, model, timeout=cfg.request_timeout, max_retries=cfg.max_retries,
                          api_key=api_key_from_env(), return_token_ids=returns_token_ids(engine),
                          extra_body=sampling_fields(engine, model, cfg.temperature, cfg.top_p)) as client:
        return await run_loop(items, client, writer, sampling, cfg.concurrency, total=cfg.num_prompts,
                              tools_refused=tools_refused, budget=budget)


def _main(resolved: dict[str, Any]) -> None:
    install_signal_handlers()
    run_stage1(resolved)


main = hydra_entry("sample", _main)


if __name__ == "__main__":
    main()
