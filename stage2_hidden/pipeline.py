"""Stage 2 end to end: conversations -> rendered rows -> shard plan -> packed forwards -> shards -> manifest.

Determinism and resume: shard k holds the kept rows [k*R, (k+1)*R) of the input order (or the rows up
to ``shard_bytes``), packed into forwards greedily inside the shard only, so its bytes depend on its own
rows alone. A shard is complete iff its final file exists (shards.py); a restart renders the input
again (cheap), skips complete shards and recomputes the others. With ``torchrun`` rank r computes
shards r, r+W, ...; rank 0 writes the vocabulary and the manifest after a barrier.

On CUDA the device->host copy of a forward's outputs goes to pinned buffers on the compute stream and a
writer thread waits on an event before writing them, so disk I/O overlaps the next forwards.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from .capture import HiddenCapture, default_layer_ids, load_target, pack_groups, validate_layer_ids
from .config import HiddenConfig, TargetConfig
from .render import ChatRenderer, Rendered, RenderStats, fit_length, template_hash
from .shards import PARTS, ShardWriter, atomic_write_text, make_schema, shard_info, write_manifest
from .vocab import build_and_save_vocab


def iter_rendered(hcfg: HiddenConfig, renderer: ChatRenderer, max_length: int, stats: RenderStats) -> Iterator[Rendered]:
    """Rendered, length-checked rows in input order (skips counted in ``stats``)."""
    from stage1_sample.formats import Skipped, load_conversations

    for item in load_conversations(hcfg.input, limit=hcfg.limit):
        stats.input += 1
        if isinstance(item, Skipped):
            stats.skip(f"input: {item.reason}")
            continue
        try:
            row = renderer.render(item.id, item.messages, getattr(item, "tools", None), stats)
        except Exception as e:  # a template that raises on this conversation (e.g. unsupported tool calls)
            stats.skip(f"render: {type(e).__name__}")
            continue
        row = fit_length(row, max_length, hcfg.on_too_long, stats)
        if row is not None:
            stats.rendered += 1
            yield row


def plan_shards(rows: Iterator[Rendered], rows_per_shard: int | None, shard_bytes: int | None,
                bytes_per_token: int) -> Iterator[tuple[int, list[Rendered]]]:
    """Consecutive rows grouped into shards: close at ``rows_per_shard`` rows or ``shard_bytes`` bytes."""
    index, cur, cur_bytes = 0, [], 0
    for row in rows:
        cur.append(row)
        cur_bytes += len(row.input_ids) * bytes_per_token
        if (rows_per_shard and len(cur) >= rows_per_shard) or (shard_bytes and cur_bytes >= shard_bytes):
            yield index, cur
            index, cur, cur_bytes = index + 1, [], 0
    if cur:
        yield index, cur


class AsyncShardWriter:
    """Writer threads: shard k is opened, filled and closed by thread k % num_threads, in job order.

    Several threads write (and fsync, and hash) different shards at once, so a disk that needs queue
    depth, or the sha256 pass, does not hold up the GPU. ``max_queue`` bounds the forwards in flight
    per thread (each holds its pinned host buffers)."""

    def __init__(self, out_dir: Path, schema, max_queue: int = 2, num_threads: int = 1):
        self.out_dir, self.schema = out_dir, schema
        self.queues = [queue.Queue(maxsize=max_queue) for _ in range(num_threads)]
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._loop, args=(q,), daemon=True) for q in self.queues]
        for t in self.threads:
            t.start()

    def put(self, job) -> None:
        """job: ("open", k) | ("rows", k, event, [(row, start, end)], hidden_TW, target_T) | ("close", k)."""
        if self.error:
            raise RuntimeError("shard writer failed") from self.error
        self.queues[job[1] % len(self.queues)].put(job)

    def _loop(self, jobs: queue.Queue) -> None:
        writer = None
        while (job := jobs.get()) is not None:
            if self.error:
                continue
            try:
                if job[0] == "open":
                    writer = ShardWriter(self.out_dir, job[1], self.schema)
                elif job[0] == "rows":
                    _, _, event, rows, hidden_TW, target_T = job
                    if event is not None:
                        event.synchronize()
                    for row, s, e in rows:
                        writer.write_row(row.id, row.input_ids, row.loss_mask, target_T[s:e], hidden_TW[s:e])
                elif job[0] == "close":
                    writer.close()
                    writer = None
            except BaseException as e:  # surfaced to the main thread on the next put / finish
                self.error = e
                if writer is not None:
                    writer.abort()
                    writer = None

    def finish(self) -> None:
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join()
        if self.error:
            raise RuntimeError("shard writer failed") from self.error


def capture_shard(cap: HiddenCapture, writer: AsyncShardWriter, index: int, rows: list[Rendered],
                  batch_tokens: int) -> int:
    """All forwards of one shard, queued for writing; returns the number of tokens."""
    writer.put(("open", index))
    for group in pack_groups([len(r.input_ids) for r in rows], batch_tokens):
        seqs = [torch.from_numpy(rows[i].input_ids) for i in group]
        out = cap.forward(seqs)
        event = None
        if out.hidden_TW.is_cuda:  # async copy to pinned memory; the writer waits on the event
            hidden = torch.empty(out.hidden_TW.shape, dtype=torch.bfloat16, pin_memory=True)
            target = torch.empty(out.target_T.shape, dtype=torch.int32, pin_memory=True)
            hidden.copy_(out.hidden_TW, non_blocking=True)
            target.copy_(out.target_T, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            hidden, target = out.hidden_TW.to(torch.bfloat16), out.target_T
        bounds, s = [], 0
        for i in group:
            bounds.append((rows[i], s, s + len(rows[i].input_ids)))
            s += len(rows[i].input_ids)
        writer.put(("rows", index, event, bounds, hidden, target))
    writer.put(("close", index))
    return sum(len(r.input_ids) for r in rows)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _dist() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return rank, world, local


def _resolve_device(hcfg: HiddenConfig, local_rank: int) -> str:
    if hcfg.device != "auto":
        return hcfg.device
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _check_identity(out_dir: Path, identity: dict, rank: int) -> None:
    """Refuse to mix shards of different settings in one folder."""
    path = out_dir / PARTS / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != identity:
            diff = sorted(k for k in identity if old.get(k) != identity[k])
            raise ValueError(f"{out_dir} holds shards made with other settings ({', '.join(diff)}); "
                             "use another hidden.output or delete it")
    elif rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=1))


def run(target: TargetConfig, hcfg: HiddenConfig) -> dict | None:
    """Run stage 2; returns the manifest on rank 0 (None on other ranks)."""
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.time()
    rank, world, local_rank = _dist()
    model_cfg = AutoConfig.from_pretrained(target.path, trust_remote_code=target.trust_remote_code)
    text_cfg = model_cfg.get_text_config()
    num_layers, hidden_size, vocab_size = text_cfg.num_hidden_layers, text_cfg.hidden_size, text_cfg.vocab_size
    layer_ids = validate_layer_ids(hcfg.layer_ids or default_layer_ids(num_layers), num_layers)
    max_length = int(hcfg.max_length or target.context_length or text_cfg.max_position_embeddings)
    tok = AutoTokenizer.from_pretrained(target.path, trust_remote_code=target.trust_remote_code)
    renderer = ChatRenderer(tok, target.chat_template_kwargs)
    out_dir = Path(hcfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = {
        "target": {"name": target.name, "path": str(target.path), "config_sha256": _sha(text_cfg.to_dict())},
        "tokenizer_sha256": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
        "chat_template_sha256": template_hash(tok), "chat_template_kwargs": dict(target.chat_template_kwargs),
        "layer_ids": layer_ids, "hidden_size": hidden_size, "num_aux_layers": len(layer_ids),
        "dtype": "bfloat16", "compute_dtype": hcfg.dtype or target.dtype, "max_length": max_length,
        "vocab_size": vocab_size, "draft_vocab_size": min(hcfg.draft_vocab_size, vocab_size),
        "input": str(hcfg.input),
    }
    identity = {**fields, "rows_per_shard": hcfg.rows_per_shard, "shard_bytes": hcfg.shard_bytes,
                "batch_tokens": hcfg.batch_tokens, "on_too_long": hcfg.on_too_long, "limit": hcfg.limit}
    _check_identity(out_dir, identity, rank)

    stats = RenderStats()
    bytes_per_token = len(layer_ids) * hidden_size * 2 + 9
    plan = plan_shards(iter_rendered(hcfg, renderer, max_length, stats), hcfg.rows_per_shard,
                       hcfg.shard_bytes, bytes_per_token)
    num_shards, computed_tokens = _capture_all(plan, target, hcfg, fields, out_dir, rank, world, local_rank)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    return _finalize(out_dir, num_shards, fields, stats, time.time() - t0, computed_tokens)


def _capture_all(plan, target, hcfg, fields, out_dir, rank, world, local_rank) -> tuple[int, int]:
    """Compute this rank's missing shards; returns (number of shards in the plan, tokens computed)."""
    from tqdm import tqdm

    cap = writer = None
    num_shards = tokens = 0
    bar = tqdm(desc=f"stage2 rank {rank}", unit="shard", disable=rank != 0)
    for index, rows in plan:
        num_shards = index + 1
        bar.update(1)
        if index % world != rank or shard_info(out_dir, index) is not None:
            continue
        if cap is None:  # load the target only when there is work
            device = _resolve_device(hcfg, local_rank)
            model = load_target(target.path, hcfg.dtype or target.dtype, device, hcfg.device_map,
                                target.trust_remote_code)
            cap = HiddenCapture(model, fields["layer_ids"], hcfg.lm_head_chunk)
            width = len(fields["layer_ids"]) * fields["hidden_size"]
            writer = AsyncShardWriter(out_dir, make_schema(width, fields["layer_ids"]), hcfg.writer_queue,
                                      hcfg.writer_threads)
        tokens += capture_shard(cap, writer, index, rows, hcfg.batch_tokens)
        bar.set_postfix(tokens=tokens)
    bar.close()
    if writer is not None:
        writer.finish()
    return num_shards, tokens


def _finalize(out_dir: Path, num_shards: int, fields: dict, stats: RenderStats, elapsed: float, computed: int) -> dict:
    infos = [shard_info(out_dir, i) for i in range(num_shards)]
    missing = [i for i, info in enumerate(infos) if info is None]
    if missing:
        raise RuntimeError(f"shards {missing[:8]} missing after all ranks finished")
    for tmp in out_dir.glob(".tmp-shard-*"):
        tmp.unlink()
    fields = dict(fields)
    fields["coverage"] = build_and_save_vocab(out_dir, [i["file"] for i in infos], fields["vocab_size"],
                                              fields["draft_vocab_size"])
    fields["accounting"] = {"input": stats.input, "written": stats.rendered, "skipped": stats.skipped,
                            "truncated": stats.truncated, "server_ids": stats.server_ids,
                            "server_ids_mismatch": stats.server_ids_mismatch, "span_fallback": stats.span_fallback}
    manifest = write_manifest(out_dir, infos, fields, elapsed_s=round(elapsed, 3))
    print(f"stage2: {manifest['num_rows']} rows, {manifest['num_tokens']} tokens in {num_shards} shards "
          f"({computed} tokens computed now, {elapsed:.1f}s); {manifest['bytes_per_token']:.1f} bytes/token; "
          f"coverage {fields['coverage']:.4f}; accounting {fields['accounting']}")
    return manifest
