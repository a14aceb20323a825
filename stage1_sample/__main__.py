"""Stage 1 entry point: ``python -m stage1_sample [hydra overrides]`` (``make sample ARGS="..."``).

Composes ``conf/sample.yaml``, saves the resolved config beside the output, starts the server
(``sample.server.engine``: vLLM, or ``transformers serve``) unless ``sample.server.urls`` points at running
servers, regenerates, prints the accounting line (with output tokens/s) and writes the manifest (with
``throughput`` and ``token_ids`` counts).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import yaml

from common.entry import config_yaml, hydra_entry
from common.files import atomic_write_text
from common.logs import get_logger
from common.server import (ENGINE_NAMES, free_port, install_signal_handlers, launch, request_model_name,
                           returns_token_ids, server_command)
from common.target import TargetSpec

from .client import ChatClient, api_key_from_env
from .config import SampleConfig
from .formats import load_conversations
from .regenerate import run_loop
from .writer import ConversationWriter

log = get_logger("stage1")
# settings that change the answers: a resumed run must use the same ones
RESUME_KEYS = [("target", "name"), ("target", "path"), ("sample", "input"), ("sample", "format"),
               ("sample", "temperature"), ("sample", "top_p"), ("sample", "max_tokens"), ("sample", "seed"),
               ("sample", "chat_template_kwargs")]


def check_resume(out_dir: Path, resolved: dict[str, Any]) -> None:
    """Refuse to resume a run whose stored config differs in a setting that changes the answers."""
    old_file = out_dir / "config.yaml"
    if not old_file.exists():
        return
    old = yaml.safe_load(old_file.read_text()) or {}
    diffs = [f"{a}.{b}: {old.get(a, {}).get(b)!r} -> {resolved[a].get(b)!r}"
             for a, b in RESUME_KEYS if old.get(a, {}).get(b) != resolved[a].get(b)]
    if diffs:
        raise ValueError(f"{out_dir} holds a run with other settings ({'; '.join(diffs)}); "
                         "use another sample.output_dir or the same settings")


def run_stage1(resolved: dict[str, Any]) -> dict[str, Any]:
    """Run stage 1 from a resolved config dict; returns the manifest."""
    cfg = SampleConfig.from_omegaconf(resolved["sample"])
    target = TargetSpec.from_mapping(resolved["target"])
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        check_resume(out_dir, resolved)
    writer = ConversationWriter(out_dir, cfg.format, cfg.rows_per_shard, resume=cfg.resume)
    atomic_write_text(out_dir / "config.yaml", config_yaml(resolved))
    sampling = cfg.sampling_params()
    sampling["chat_template_kwargs"] = {**target.chat_template_kwargs, **cfg.chat_template_kwargs}
    engine = cfg.server.engine
    model_name = request_model_name(engine, target.path, target.served_name)
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            urls = cfg.server.urls
            if cfg.server.launch and not urls:
                port = cfg.server.port or free_port()
                cmd = server_command(engine, target.path, target.served_name, port, dtype=target.dtype,
                                     max_model_len=target.max_model_len, trust_remote_code=target.trust_remote_code,
                                     extra_args=cfg.server.extra_args, cb=cfg.cb_bounds())
                server = launch(engine, cmd, port=port, env=cfg.server.env, log_file=out_dir / "server.log",
                                startup_timeout=cfg.server.startup_timeout)
                log.info("starting %s for %s (log: %s)", ENGINE_NAMES[engine], target.path, server.log_file)
                urls = [stack.enter_context(server).url]
            items = load_conversations(cfg.input, limit=cfg.num_prompts)
            tally = asyncio.run(_sample(items, urls, model_name, cfg, writer, sampling))
    except BaseException:
        writer.close()  # leave the partial shard for sample.resume=true
        raise
    manifest = writer.finish(
        {
            "target": {"name": target.name, "path": target.path, "served_name": target.served_name},
            "input": cfg.input,
            "sampling": sampling,
            "shard_format": cfg.format,
            "server": {"engine": engine, "launched": bool(cfg.server.launch and not cfg.server.urls),
                       "concurrency": cfg.concurrency},
            "elapsed_s": round(time.monotonic() - t0, 1),
            "throughput": tally.throughput(),  # this pass, server start-up excluded
        },
        tally.accounting(),
    )
    print(tally.line(), flush=True)
    counts = manifest["token_ids"]
    print(f"token ids: {counts['with_server_ids']} conversations with the server's ids, "
          f"{counts['without_server_ids']} without (stage 2 re-tokenises their text)", flush=True)
    print(f"wrote {manifest['num_rows']} conversations in {len(manifest['shards'])} shard(s) to {out_dir}", flush=True)
    return manifest


async def _sample(items: Any, urls: list[str], model: str, cfg: SampleConfig, writer: ConversationWriter,
                  sampling: dict[str, Any]) -> Any:
    async with ChatClient(urls, model, timeout=cfg.request_timeout, max_retries=cfg.max_retries,
                          api_key=api_key_from_env(), return_token_ids=returns_token_ids(cfg.server.engine)) as client:
        return await run_loop(items, client, writer, sampling, cfg.concurrency, total=cfg.num_prompts)


def _main(resolved: dict[str, Any]) -> None:
    install_signal_handlers()
    run_stage1(resolved)


main = hydra_entry("sample", _main)


if __name__ == "__main__":
    main()
