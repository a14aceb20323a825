"""The stage-3 training loop: shards -> FSDP2 draft with training-time test -> checkpoints, metrics, export.

Launch: `torchrun --nproc-per-node N -m stage3_train ...` (NCCL on GPUs, gloo on CPU). Run without torchrun it
initialises a 1-rank process group on 127.0.0.1, so one process takes exactly the FSDP2 + DCP code path that N take.

One optimizer step (global batch = world * batch_rows * grad_accum packed rows):
    valid_i   = all_reduce_sum over ranks and micro-batches of ttt.valid_mask(...)[i].sum()
    w_i       = step_decay**i / valid_i
    loss      = sum over ranks, micro-batches, TTT steps i of  w_i * CE_sum_i     (ttt_forward returns sum_i w_i CE_i)
FSDP2 sums (not averages) the gradients over ranks (see parallelize.py), so the update is that of the global
loss sum_i 0.8^i * mean CE_i, independent of how the rows are spread over ranks and micro-batches.

The step is `Trainer.train_step()` (micro-batches forward + backward, clipping, AdamW, LR schedule): the loop runs it
and benchmarks/bench_stage3.py times it; kernels, FSDP2 and the recompute choice all come from `parallelize()`.

Sequence parallelism (`train.sequence_parallel=N`, rows longer than one GPU holds): the world is a ("dp", "sp")
mesh; the N ranks of an SP group load the same rows (the loader sees dp_rank / dp_size) and each trains a contiguous
slice of every row (sequence_parallel.py). Valid counts and gradient sums run over the whole world as above, so the
update equals the one of whole rows on dp_size ranks.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from common.distributed import World, init_world
from common.logs import get_logger
from common.target import load_config_json
from stage3_train import checkpoint
from stage3_train.config import TrainConfig
from stage3_train.data import (MicroBatch, PackedLoader, Prefetcher, check_manifest, eval_batches, open_shards,
                               split_rows)
from stage3_train.metrics import MetricsLogger, StepStats, format_line, peak_flops
from stage3_train.parallelize import parallelize
from stage3_train.sequence_parallel import SPGroup, shard_collated

log = get_logger("stage3")


def build_model(cfg: TrainConfig, ds, target_cfg: dict[str, Any], target_dir: Path, device: torch.device):
    """The draft on `device` in fp32: shape from the target, vocab from the shards, frozen target embeddings,
    weights seeded (same init for any world size) or from a published draft (`train.init_from`)."""
    from stage2_hidden.vocab import load_vocab
    from stage3_train.model import DraftConfig, Eagle3Draft
    from stage3_train.target_embeddings import load_target_embeddings

    layer_ids = check_manifest(ds.manifest, target_cfg, cfg.layer_ids, cfg.input)
    d2t, t2d = load_vocab(cfg.input)
    overrides = {"num_aux_layers": len(layer_ids), "target_hidden_size": int(ds.manifest["hidden_size"]),
                 **cfg.draft_overrides}
    draft_cfg = DraftConfig.from_target_config(target_cfg, len(d2t), **overrides)
    torch.manual_seed(cfg.seed)
    model = Eagle3Draft(draft_cfg)
    model.set_vocab(d2t, t2d)
    if cfg.init_from:
        from stage3_train.export import load_into

        load_into(model, Path(cfg.init_from))
    load_target_embeddings(model, target_dir)
    return model.to(device), draft_cfg, layer_ids


def run_meta(draft_cfg, target_cfg: dict[str, Any], layer_ids: list[int], target: dict[str, Any]) -> dict[str, Any]:
    """What export needs beside the weights (stored in every checkpoint folder): shapes, target config, layers."""
    import dataclasses

    return {"shape": dataclasses.asdict(draft_cfg), "target_config": target_cfg, "layer_ids": list(layer_ids),
            "target": {k: target.get(k) for k in ("name", "path", "hub_id")}}


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier for 0-based step: linear warm-up to 1 over `warmup` steps, then cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def prepare_batch(mb: MicroBatch, d: World, k: int, sp: SPGroup | None):
    """A MicroBatch -> (PackedBatch on the device, None), or with sequence parallelism this rank's slice and its
    SequenceShard (the loader collated only this rank's hidden slice: host and device memory O(T/N))."""
    if sp is None:
        return mb.packed(d.device), None
    return shard_collated(mb, sp, k, d.device)


def forward_backward(model, micro: list[MicroBatch], *, k: int, decay: float, ac: bool, step: int, d: World,
                     sp: SPGroup | None = None) -> StepStats:
    """Forward/backward over the micro-batches of one optimizer step (no optimizer update).

    Returns the global StepStats (summed over micro-batches, all-reduced over ranks). Raises FloatingPointError
    naming the step, rank, micro-batch and conversation ids on a non-finite loss (before any update or save).
    """
    from stage3_train.ttt import ttt_forward, valid_mask

    batches = [prepare_batch(mb, d, k, sp) for mb in micro]
    valid_k = sum(valid_mask(b, k, model.t2d, None if s is None else s.halo).sum(dim=(1, 2))
                  for b, s in batches).to(torch.float64)
    dist.all_reduce(valid_k)
    weights_k = decay ** torch.arange(k, dtype=torch.float64, device=d.device) / valid_k.clamp(min=1)
    local: list[StepStats] = []
    for j, (b, s) in enumerate(batches):
        model.set_requires_gradient_sync(j == len(batches) - 1)  # reduce-scatter once, after the last micro-batch
        out = ttt_forward(model, b, weights_k.float(), k, checkpoint=ac, sp=s)
        out.loss.backward()
        sq = micro[j].sq_tokens if sp is None or sp.rank == 0 else 0  # whole rows: count once per SP group
        local.append(StepStats(out.ce_sum.double(), out.correct.double(), out.valid.double(),
                               (b.doc_ids >= 0).sum().double(),  # on device: no host sync per micro-batch
                               torch.tensor(float(sq), dtype=torch.float64).to(d.device, non_blocking=True)))
    stats = sum(local[1:], local[0]).all_reduce()
    if not stats.finite():
        bad = [j for j, st in enumerate(local) if not st.finite()]
        where = (f"rank {d.rank} micro-batch {bad[0]} conversations {micro[bad[0]].conversation_ids}" if bad
                 else f"another rank than {d.rank}")
        raise FloatingPointError(f"non-finite loss at step {step} (epoch {micro[0].epoch}, micro-steps "
                                 f"{[m.micro_step for m in micro]}): {where}; nothing was saved for this step")
    return stats


def _clip(model, max_norm: float, step: int) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not math.isfinite(norm):
        raise FloatingPointError(f"non-finite gradient norm at step {step}; nothing was saved for this step")
    return norm


@torch.no_grad()
def validate(model, ds, val_idx: list[int], cfg: TrainConfig, d: World, sp: SPGroup | None = None, *,
             step: int) -> dict[str, Any]:
    """Loss, per-step accuracy and acceptance length over the validation rows (all ranks, every row once).

    Raises FloatingPointError naming the step (and, on the rank that had them, the conversation ids) when the
    loss is not finite: a diverged draft is stopped as in training, before anything is saved or exported.
    """
    from stage3_train.ttt import ttt_forward

    k = cfg.ttt_steps
    stats = StepStats.zeros(k, d.device)
    ones_k = torch.ones(k, device=d.device)
    first_bad = None  # conversation ids of this rank's first micro-batch with a non-finite loss
    rank, world = (d.rank, d.world_size) if sp is None else (sp.dp_rank, sp.dp_size)
    part = None if sp is None else (sp.rank, sp.size)
    for mb in eval_batches(ds, val_idx, max_tokens=cfg.max_tokens, batch_rows=cfg.batch_rows, rank=rank,
                           world_size=world, pad_multiple=cfg.pad_multiple, max_rows=cfg.val_max_rows,
                           hidden_part=part):
        batch, shard = prepare_batch(mb, d, k, sp)
        out = ttt_forward(model, batch, ones_k, k, checkpoint=False, sp=shard)
        zero = stats.tokens.new_zeros(())
        if first_bad is None and not bool(torch.isfinite(out.ce_sum).all()):  # a host sync: not the hot path
            first_bad = mb.conversation_ids
        stats = stats + StepStats(out.ce_sum.double(), out.correct.double(), out.valid.double(), zero, zero)
    summary = stats.all_reduce().summarize(cfg.step_decay)  # every rank sees the same sum: all raise together
    if not math.isfinite(summary["loss"]):
        where = f"rank {d.rank} conversations {first_bad}" if first_bad is not None else f"another rank than {d.rank}"
        raise FloatingPointError(f"non-finite validation loss at step {step}: {where}; nothing was saved or "
                                 "exported for this step")
    return summary


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class Trainer:
    """Holds the run's objects; `run()` is the whole loop. Split out of one function to keep each piece short."""

    def __init__(self, cfg: TrainConfig, target: dict[str, Any], d: World):
        # The draft's step returns views (v = v_proj(x).view(...)); nothing writes into them in place, so
        # FSDP2's warning about in-place ops on views does not apply.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        self.cfg, self.d = cfg, d
        self.out = Path(cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        self.ds = open_shards(cfg.input, cfg.verify_shards)
        cfg = self.cfg = self._with_row_length(cfg)
        self.target_dir, target_cfg = load_config_json(target["path"])
        self.model, self.draft_cfg, self.layer_ids = build_model(cfg, self.ds, target_cfg, self.target_dir,
                                                                 self.d.device)
        self.meta = run_meta(self.draft_cfg, target_cfg, self.layer_ids, target)
        self.ac = parallelize(self.model, mesh=self.d.fsdp_mesh, param_dtype=cfg.param_dtype,
                              activation_checkpointing=cfg.activation_checkpointing,
                              tokens_per_micro_batch=cfg.max_tokens * cfg.batch_rows // cfg.sequence_parallel,
                              ttt_steps=cfg.ttt_steps, cpu_offload=cfg.cpu_offload)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                           fused=self.d.device.type == "cuda" and not cfg.cpu_offload)  # GPUs:
        # one kernel per step; cpu_offload: the parameters and states are host tensors (the foreach CPU step)
        # sequence parallelism: ranks of one SP group share rows (the loader sees the dp axis only)
        self.sp = SPGroup.create(cfg.sequence_parallel, d.device.type) if cfg.sequence_parallel > 1 else None
        dp_rank, dp_size = (d.rank, d.world_size) if self.sp is None else (self.sp.dp_rank, self.sp.dp_size)
        train_idx, self.val_idx = split_rows([str(self.ds[i]["id"]) for i in range(len(self.ds))], cfg.val_fraction)
        self.loader = PackedLoader(self.ds, train_idx, max_tokens=cfg.max_tokens, batch_rows=cfg.batch_rows,
                                   rank=dp_rank, world_size=dp_size, seed=cfg.seed,
                                   hidden_part=None if self.sp is None else (self.sp.rank, self.sp.size),
                                   pad_multiple=cfg.pad_multiple)
        cfg = self.cfg = self._with_step_count(cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.step = self._maybe_resume()
        self.metrics = MetricsLogger(self.out, enabled=self.d.rank == 0,
                                     resume_step=self.step if self.step else None, wandb_cfg=cfg.wandb,
                                     config=cfg.to_dict())
        self.peak = peak_flops(self.d.device, cfg.peak_tflops)

    def _with_row_length(self, cfg: TrainConfig) -> TrainConfig:
        """`train.max_tokens`, or the length stage 2 cut the conversations to (its manifest)."""
        resolved = cfg.with_row_length(self.ds.manifest)
        if cfg.max_tokens is None:
            self.log(f"train.max_tokens=null: rows of {resolved.max_tokens} tokens (max_length of {cfg.input})")
        return resolved

    def _with_step_count(self, cfg: TrainConfig) -> TrainConfig:
        """`train.steps`, or `train.epochs` passes over this rank's rows (every rank counts the same)."""
        resolved = cfg.with_step_count(self.loader.steps_per_epoch())
        if cfg.steps is None:
            self.log(f"train.steps=null: {cfg.epochs:g} epoch(s) = {resolved.steps} optimizer steps")
        return resolved

    def _maybe_resume(self) -> int:
        found = checkpoint.latest(self.ckpt_root)
        if found is None:
            if self.cfg.resume:
                self.log(f"train.resume=true but no complete checkpoint in {self.ckpt_root}: starting at step 0")
            return 0
        if not self.cfg.resume:
            raise ValueError(f"{self.ckpt_root} already holds checkpoints (latest {found.name}); set "
                             f"train.resume=true to continue that run, or choose another train.output")
        state = checkpoint.load(found, self.model, self.optimizer, root=self.ckpt_root)  # own run folder only
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        self.log(f"resumed from {found} at step {state['step']}")
        return int(state["step"])

    def log(self, text: str) -> None:
        log.info(text)  # rank 0 only (common.logs)

    def save(self) -> None:
        train_state = {"scheduler": self.scheduler.state_dict(), "data": self.batches.state_dict(),
                       "world_size": self.d.world_size, "config": self.cfg.to_dict()}
        folder = checkpoint.save(self.ckpt_root, self.step, self.model, self.optimizer, train_state, self.meta,
                                 self.cfg.keep_ckpts)
        self.log(f"checkpoint {folder}")

    def _log_train(self, window: StepStats, t0: float, t_run: float, done: int, grad_norm: float) -> None:
        from stage3_train.model import num_flops_per_token

        cfg = self.cfg
        m = window.summarize(cfg.step_decay)
        elapsed = time.perf_counter() - t0
        tokens, sq = float(window.tokens), float(window.sq_tokens)
        m["tokens_per_s"] = tokens / elapsed
        flops = num_flops_per_token(self.draft_cfg, cfg.ttt_steps, int(sq / max(tokens, 1.0)))
        m["mfu"] = m["tokens_per_s"] / self.d.world_size * flops / self.peak if self.peak else None
        m["lr"] = self.scheduler.get_last_lr()[0]
        m["grad_norm"] = grad_norm
        m["peak_mem_gib"] = _peak_mem_gib(self.d.device)
        m["eta_s"] = (time.perf_counter() - t_run) / max(done, 1) * (cfg.steps - self.step)
        self.log(format_line(self.step, cfg.steps, m))
        self.metrics.log("train", self.step, {key: v for key, v in m.items() if key != "valid"})

    def _eval(self) -> None:
        if not self.val_idx:
            return
        m = validate(self.model, self.ds, self.val_idx, self.cfg, self.d, self.sp, step=self.step)
        acc = " ".join(f"{a:.3f}" for a in m["acc"])
        self.log(f"val  step {self.step:>6} | loss {m['loss']:.4f} | acc {acc} | accept {m['accept_len']:.2f}")
        self.metrics.log("val", self.step, {key: v for key, v in m.items() if key != "valid"})

    def open_batches(self) -> Prefetcher:
        """Start the background collation of this rank's micro-batches (`train_step` reads from it)."""
        self.batches = Prefetcher(self.loader, pin_memory=self.d.device.type == "cuda")
        return self.batches

    def train_step(self) -> tuple[StepStats, float]:
        """One optimizer step, the loop's whole body: grad_accum micro-batches forward + backward, gradient
        clipping, AdamW step, LR-schedule step. Returns the step's global StepStats and the gradient norm.
        benchmarks/bench_stage3.py times exactly this method."""
        cfg = self.cfg
        micro = [next(self.batches) for _ in range(cfg.grad_accum)]
        stats = forward_backward(self.model, micro, k=cfg.ttt_steps, decay=cfg.step_decay, ac=self.ac,
                                 step=self.step + 1, d=self.d, sp=self.sp)
        grad_norm = _clip(self.model, cfg.grad_clip, self.step + 1)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats, grad_norm

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.log(f"{len(self.ds)} conversations ({len(self.val_idx)} held out), world {self.d.world_size} "
                 f"(sequence parallel {cfg.sequence_parallel}), "
                 f"{self.loader.steps_per_epoch() // cfg.grad_accum} steps/epoch, from step {self.step} to {cfg.steps}")
        self.open_batches()
        try:
            self._loop()
        except BaseException:
            self.metrics.close()  # keep the curves up to the failure; no checkpoint is written for the bad step
            raise
        finally:
            self.batches.close()
        return self.finish()

    def _loop(self) -> None:
        cfg = self.cfg
        window = StepStats.zeros(cfg.ttt_steps, self.d.device)
        t0 = t_run = time.perf_counter()
        start, last_val = self.step, None
        while self.step < cfg.steps:
            stats, grad_norm = self.train_step()
            window = window + stats
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log_train(window, t0, t_run, self.step - start, grad_norm)
                window = StepStats.zeros(cfg.ttt_steps, self.d.device)
                t0 = time.perf_counter()
            # validation comes before the same step's save: a non-finite validation loss (FloatingPointError)
            # stops the run with nothing saved or exported for that step, like a non-finite training loss
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps:
                self._eval()
                last_val = self.step
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.steps:
                self.save()
        if last_val != self.step:  # resumed at the last step: the loop did not run; validate before the export
            self._eval()

    def finish(self) -> dict[str, Any]:
        export_dir = None
        if self.cfg.export:
            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
            if self.d.rank == 0:
                from stage3_train.export import export_state

                export_dir = export_state(state, self.meta, self.out / "export")
                self.log(f"exported {export_dir}")
        png = self.metrics.close()
        if png:
            self.log(f"curves {png}")
        dist.barrier()
        return {"step": self.step, "out": str(self.out), "export": str(export_dir) if export_dir else None}


def run(cfg: TrainConfig, target: dict[str, Any]) -> dict[str, Any]:
    """Train per `cfg` against `target` (the conf/target preset: path, trust_remote_code, ...)."""
    d = init_world(cfg.device, sp_size=cfg.sequence_parallel)
    try:
        return Trainer(cfg, target, d).run()
    finally:
        d.close()
