"""Stage 2 end to end: conversations -> rendered rows -> shard plan -> packed forwards -> shards -> manifest.

Determinism and resume: shard k holds the kept rows [k*R, (k+1)*R) of the input order (or the rows up
to ``shard_bytes``), packed into forwards greedily inside the shard only, so its bytes depend on its own
rows alone. A shard is complete iff its final file and its record exist and the file still hashes to the record
(shards.py ``shard_info``: re-hashed on every restart, so a damaged shard is rewritten, not carried into a new
manifest); a restart renders the input again (cheap), keeps complete shards and recomputes the others. With
``torchrun`` rank r computes shards r, r+W, ...; rank 0 writes the vocabulary and the manifest after a barrier.

Failures say what to do: a full disk names the folder and what the remaining shards need (bytes per token x their
tokens); an input that yields no rows stops the run (``hidden.allow_empty=true`` writes the empty shard set).

On CUDA the device->host copy of a forward's outputs goes to a ring of pinned buffers on a side stream
(staging.py) and a writer thread waits on its event before writing them, so the copy and the disk I/O overlap
the next forwards and the host loop never synchronises with the device.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from common.distributed import World, init_world
from common.files import atomic_write_text
from common.logs import get_logger
from common.target import TargetSpec, aux_layer_ids

from .capture import HiddenCapture, load_target, pack_groups
from .config import HiddenConfig
from .format import PARTS, bytes_per_token, make_schema, shard_name
from .render import ChatRenderer, Rendered, RenderStats, fit_length, template_hash
from .shards import ShardWriter, shard_info, write_manifest
from .staging import HostStaging
from .vocab import build_and_save_vocab

log = get_logger("stage2")


def iter_rendered(hcfg: HiddenConfig, renderer: ChatRenderer, max_length: int, stats: RenderStats,
                  conversations: Iterable | None = None) -> Iterator[Rendered]:
    """Rendered, length-checked rows in input order (skips counted in ``stats``); ``conversations``: the input
    already opened (``open_conversations``), else ``hcfg.input`` is read here. With ``hidden.drop_eval_prompts`` a
    conversation opening on an evaluation prompt is skipped as ``input: first user turn is an evaluation prompt
    (<id>)``: a stage-1 output made with ``sample.drop_eval_prompts`` has none left, a raw prompt set may."""
    from evaluation.holdout import drop_evaluation_prompts
    from stage1_sample.formats import Skipped, load_conversations

    if conversations is None:
        conversations = load_conversations(hcfg.input, limit=hcfg.num_prompts)
    for item in drop_evaluation_prompts(conversations) if hcfg.drop_eval_prompts else conversations:
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


class ShardWriteError(RuntimeError):
    """A shard writer thread failed; the message says why (``disk_full``: no space left on the device)."""

    def __init__(self, message: str, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class AsyncShardWriter:
    """Writer threads: shard k is opened, filled and closed by thread k % num_threads, in job order.

    Several threads write different shards at once (each shard also hashes and flushes on its own helper
    threads, see ``ShardWriter``), so closing one shard does not hold up the rows of the next. The rows are
    hashed straight from the staging buffer, which goes back to the ring once they are.
    ``max_queue`` bounds the jobs waiting per thread. The first error stops all writing; ``put`` and ``finish``
    raise it as a ``ShardWriteError``."""

    def __init__(self, out_dir: Path, schema, max_queue: int = 2, num_threads: int = 1):
        self.out_dir, self.schema = out_dir, schema
        self.queues = [queue.Queue(maxsize=max_queue) for _ in range(num_threads)]
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._loop, args=(q,), daemon=True) for q in self.queues]
        for t in self.threads:
            t.start()

    def put(self, job) -> None:
        """job: ("open", k) | ("rows", k, Staged, [(row, start, end)]) | ("close", k)."""
        if self.error:
            if job[0] == "rows":
                job[2].release()
            raise self._failure() from self.error
        self.queues[job[1] % len(self.queues)].put(job)

    def _failure(self) -> ShardWriteError:
        e = self.error
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            free = shutil.disk_usage(self.out_dir).free  # the failed shard's temp file is deleted by now
            return ShardWriteError(f"no space left on device writing shards to {self.out_dir} ({_gib(free)} free "
                                   "there now)", disk_full=True)
        return ShardWriteError(f"shard writer failed writing to {self.out_dir}: {type(e).__name__}: {e}")

    def _loop(self, jobs: queue.Queue) -> None:
        writer = None
        while (job := jobs.get()) is not None:
            handed_over = False  # a staging buffer goes back to the ring once its bytes are hashed
            try:
                if self.error:
                    continue
                if job[0] == "open":
                    writer = ShardWriter(self.out_dir, job[1], self.schema, async_hash=True)
                elif job[0] == "rows":
                    _, _, staged, rows = job
                    staged.wait()
                    for row, s, e in rows:
                        scale = None if staged.scale_TL is None else staged.scale_TL[s:e]
                        writer.write_row(row.id, row.input_ids, row.loss_mask, staged.target_T[s:e],
                                         staged.hidden_TW[s:e], scale)
                    writer.after_hashed(staged.release)
                    handed_over = True
                elif job[0] == "close":
                    writer.close()
                    writer = None
            except BaseException as e:  # surfaced to the main thread on the next put / finish
                if writer is not None:
                    writer.abort()  # joins the hasher: nothing reads the staging buffer after this
                    writer = None
                self.error = self.error or e  # after abort: the temp file's space is free when it is reported
            finally:
                if job[0] == "rows" and not handed_over:
                    job[2].release()

    def join(self) -> None:
        """Let every thread finish its queue (all of it skipped after an error) and end."""
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join()

    def finish(self) -> None:
        self.join()
        if self.error:
            raise self._failure() from self.error


def capture_shard(cap: HiddenCapture, writer: AsyncShardWriter, staging: HostStaging, index: int,
                  rows: list[Rendered], batch_tokens: int) -> int:
    """All forwards of one shard, queued for writing; returns the number of tokens. The host thread
    never waits for the device here: copies are staged asynchronously and the writer waits for them."""
    writer.put(("open", index))
    for group in pack_groups([len(r.input_ids) for r in rows], batch_tokens):
        out = cap.forward([torch.from_numpy(rows[i].input_ids) for i in group])
        staged = staging.stage(out.hidden_TW, out.target_T)
        bounds, s = [], 0
        for i in group:
            bounds.append((rows[i], s, s + len(rows[i].input_ids)))
            s += len(rows[i].input_ids)
        writer.put(("rows", index, staged, bounds))
    writer.put(("close", index))
    return sum(len(r.input_ids) for r in rows)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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


def run(target: TargetSpec, hcfg: HiddenConfig) -> dict | None:
    """Run stage 2; returns the manifest on rank 0 (None on other ranks). Ranks talk over gloo (they may share one
    GPU: a small target is host-bound in one process)."""
    world = init_world(hcfg.device, backend="gloo", timeout=datetime.timedelta(hours=48))
    try:
        check_device_map(hcfg, world.world_size)
        return _run(target, hcfg, world)
    finally:
        world.close()


def check_device_map(hcfg: HiddenConfig, world_size: int) -> None:
    """`hidden.device_map` spreads one copy of the target over every GPU the process sees; torchrun's ranks all see
    the same GPUs, so each would load a whole copy onto them: refused (run one process)."""
    if hcfg.device_map and world_size > 1:
        raise ValueError(f"hidden.device_map={hcfg.device_map} spreads one target over all the GPUs, but {world_size} "
                         "processes run (NPROC / torchrun): each would load a whole copy; run one process (NPROC=1)")


def _run(target: TargetSpec, hcfg: HiddenConfig, world_info: World) -> dict | None:
    from transformers import AutoConfig, AutoTokenizer

    from stage1_sample.formats import open_conversations

    t0 = time.time()
    # the input is opened before anything is written: a missing or unfinished one fails with no output folder made
    conversations = open_conversations(hcfg.input, limit=hcfg.num_prompts)
    if conversations is None and not hcfg.allow_empty:
        raise ValueError(_empty_message(hcfg, RenderStats()))
    rank, world = world_info.rank, world_info.world_size
    model_cfg = AutoConfig.from_pretrained(target.path, trust_remote_code=target.trust_remote_code)
    text_cfg = model_cfg.get_text_config()
    num_layers, hidden_size, vocab_size = text_cfg.num_hidden_layers, text_cfg.hidden_size, text_cfg.vocab_size
    layer_ids = aux_layer_ids(hcfg.layer_ids, num_layers, "hidden.layer_ids")
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
        "dtype": hcfg.storage_dtype, "compute_dtype": hcfg.dtype or target.dtype, "max_length": max_length,
        "vocab_size": vocab_size, "draft_vocab_size": min(hcfg.draft_vocab_size, vocab_size),
        "input": str(hcfg.input),
    }
    identity = {**fields, "rows_per_shard": hcfg.rows_per_shard, "shard_bytes": hcfg.shard_bytes,
                "batch_tokens": hcfg.batch_tokens, "on_too_long": hcfg.on_too_long, "num_prompts": hcfg.num_prompts,
                "drop_eval_prompts": hcfg.drop_eval_prompts}  # which rows the shards hold
    _check_identity(out_dir, identity, rank)

    stats = RenderStats()
    row_bytes = bytes_per_token(len(layer_ids) * hidden_size, len(layer_ids), hcfg.storage_dtype)
    plan = plan_shards(iter_rendered(hcfg, renderer, max_length, stats, conversations or iter(())),
                       hcfg.rows_per_shard, hcfg.shard_bytes, row_bytes)
    num_shards, computed_tokens = _capture_all(plan, target, hcfg, fields, out_dir, world_info)
    if stats.rendered == 0 and not hcfg.allow_empty:  # every rank read the same input: all raise, none waits
        raise ValueError(_empty_message(hcfg, stats))
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    return _finalize(out_dir, num_shards, fields, stats, time.time() - t0, computed_tokens)


def _empty_message(hcfg: HiddenConfig, stats: RenderStats) -> str:
    why = ("it has no conversations" if stats.input == 0 else
           f"all {stats.input} of its conversations were skipped ({stats.skipped})")
    return (f"stage 2 found nothing to write: hidden.input={hcfg.input}: {why}, so stage 3 would have nothing to "
            "train on. Check the input (did stage 1 write any conversations? is hidden.num_prompts or "
            "hidden.max_length too small?), or set hidden.allow_empty=true to write an empty shard set anyway")


def _capture_all(plan, target, hcfg, fields, out_dir, world_info: World) -> tuple[int, int]:
    """Compute this rank's missing shards; returns (number of shards in the plan, tokens computed). A full disk is a
    ``ShardWriteError`` saying what the shards still to write need."""
    from tqdm import tqdm

    rank, world = world_info.rank, world_info.world_size

    cap = writer = staging = None
    num_shards = tokens = 0
    queued: dict[int, int] = {}  # shard index -> tokens, for the shards handed to the writer
    bar = tqdm(desc=f"stage2 rank {rank}", unit="shard", disable=rank != 0)
    try:
        for index, rows in plan:
            num_shards = index + 1
            bar.update(1)
            if index % world != rank or shard_info(out_dir, index, verify=True) is not None:
                continue
            if cap is None:  # load the target only when there is work
                model = load_target(target.path, hcfg.dtype or target.dtype, world_info.device, hcfg.device_map,
                                    target.trust_remote_code)
                cap = HiddenCapture(model, fields["layer_ids"], hcfg.lm_head_chunk)
                width = len(fields["layer_ids"]) * fields["hidden_size"]
                schema = make_schema(width, fields["layer_ids"], fields["dtype"])
                writer = AsyncShardWriter(out_dir, schema, hcfg.writer_queue, hcfg.writer_threads)
                staging = HostStaging(hcfg.writer_queue + 1, hcfg.batch_tokens, width, cap.device, fields["dtype"],
                                      len(fields["layer_ids"]))
            queued[index] = sum(len(r.input_ids) for r in rows)
            tokens += capture_shard(cap, writer, staging, index, rows, hcfg.batch_tokens)
            bar.set_postfix(tokens=tokens)
        if writer is not None:
            writer.finish()
    except ShardWriteError as e:
        writer.join()
        if not e.disk_full:
            raise
        raise _disk_full(e, plan, queued, fields, out_dir, rank, world) from e.__cause__
    finally:
        bar.close()
    return num_shards, tokens


def _disk_full(e: ShardWriteError, rest, queued: dict[int, int], fields: dict, out_dir: Path, rank: int,
               world: int) -> ShardWriteError:
    """The full-disk error with what this rank's unwritten shards need: bytes per token (format.bytes_per_token,
    Arrow's few hundred bytes per row aside) x their tokens, counted by rendering the rest of the input (cheap next
    to the forwards already done)."""
    log.info("disk full: counting the tokens of the shards still to write (rendering the rest of the input)")
    left = {k: n for k, n in queued.items() if not (out_dir / shard_name(k)).exists()}
    for index, rows in rest:
        if index % world == rank and not (out_dir / shard_name(index)).exists():
            left[index] = sum(len(r.input_ids) for r in rows)
    num_aux = len(fields["layer_ids"])
    per_token = bytes_per_token(num_aux * fields["hidden_size"], num_aux, fields["dtype"])
    num_tokens = sum(left.values())
    whose = "" if world == 1 else f" of rank {rank}"
    return ShardWriteError(
        f"{e}; the {len(left)} shards{whose} still to write need about {_gib(per_token * num_tokens)} "
        f"({per_token} bytes/token x {num_tokens:,} tokens). Free that much space in {out_dir} (or point "
        "hidden.output at a larger disk and move the folder there), then run the same command again: the complete "
        "shards are kept", disk_full=True)


def _finalize(out_dir: Path, num_shards: int, fields: dict, stats: RenderStats, elapsed: float, computed: int) -> dict:
    infos = [shard_info(out_dir, i) for i in range(num_shards)]  # re-hashed by their ranks already
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
    log.info(f"{manifest['num_rows']} rows, {manifest['num_tokens']} tokens in {num_shards} shards "
          f"({computed} tokens computed now, {elapsed:.1f}s); {manifest['bytes_per_token']:.1f} bytes/token; "
          f"coverage {fields['coverage']:.4f}; accounting {fields['accounting']}")
    return manifest
