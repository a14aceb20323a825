"""Run configuration of stage 3 (`make train`): one dataclass, a comment per field, checks in __post_init__.

The YAML (`conf/train.yaml`) is the user-facing source; `TrainConfig.from_dict` turns its `train:` section (its
`advanced:` block folded in: common/advanced.py) into this schema and refuses unknown keys, so a typo on the command line is a ValueError, not a silently ignored knob.
No hydra import here: the GPU stack has no hydra, and benchmarks/tests build TrainConfig directly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common.advanced import merge_advanced, setting_name

# the fields conf/train.yaml keeps under train.advanced
ADVANCED = ("step_decay", "min_lr_ratio", "weight_decay", "betas", "grad_clip", "val_max_rows", "verify_shards",
            "log_every", "keep_ckpts", "draft_overrides", "pad_multiple", "peak_tflops")


def setting(field_name: str) -> str:
    return setting_name("train", field_name, ADVANCED)


@dataclass
class WandbConfig:
    project: str | None = None  # W&B project; None (default) = no W&B (also skipped when wandb is not importable)
    name: str | None = None     # run name; None = the run folder's name
    entity: str | None = None   # W&B entity (team); None = the user's default


@dataclass
class TrainConfig:
    # ---- where ----
    input: str = "data/hidden/smollm2-135m"  # stage-2 shard folder (manifest.json + shard-*.arrow + vocab.safetensors)
    output: str = "data/train/smollm2-135m"  # run folder: checkpoints, metrics.jsonl, tb/, curves.png, export/

    init_from: str | None = None             # a published EAGLE-3 export folder to fine-tune (None = random init)
    # ---- data ----
    seed: int = 0                  # model init + data order; same seed => same run, for any world size
    # tokens per packed row (conversations longer than this are truncated); None = the shards' max_length, what
    # stage 2 cut them to (its manifest; with_row_length)
    max_tokens: int | None = None
    batch_rows: int = 1            # packed rows per micro-batch per rank
    grad_accum: int = 1            # micro-batches per optimizer step; global batch = world * batch_rows * grad_accum
    val_fraction: float = 0.02     # share of conversations held out for validation (by a hash of their id)
    val_max_rows: int = 64         # at most this many validation rows per evaluation (0 = all)
    # shard integrity as rows are read (stage2_hidden/reader.py): the manifest against each shard's own record at
    # open, then each row's sha256 the first time the loader's background thread collates it (old shards without
    # per-row sums: the whole shard on first read); a mismatch stops training naming the shard. false skips it
    verify_shards: bool = True
    layer_ids: list[int] | None = None  # aux layer ids (vLLM ids); None = the shards' (stage 2's manifest); a list must equal them
    # ---- model / TTT ----
    # draft steps unrolled in training (training-time test), each fed the draft's own previous output; the k a
    # server drafts (eval / bench num_speculative_tokens) is chosen at serving time and should be <= ttt_steps
    ttt_steps: int = 7
    step_decay: float = 0.8        # loss weight of TTT step i is step_decay**i (normalised by the global valid count)
    # recompute each TTT step in backward (memory linear in T, ~+30% FLOPs): true | false | auto = only when the
    # activations of max_tokens * batch_rows tokens would not fit the free device memory (parallelize.py)
    activation_checkpointing: bool | str = "auto"
    sequence_parallel: int = 1     # ranks sharing each row (split along the sequence); data parallel over world/N
    param_dtype: str = "bfloat16"  # FSDP2 compute dtype of params (bfloat16 | float32); master copy stays fp32
    # FSDP2 CPUOffloadPolicy: the fp32 master weights, their gradients and the AdamW moments live in pinned host
    # memory and the optimizer step runs on the CPU (the GPU keeps activations, the bf16 compute copies and the
    # frozen embeddings). ~6.3 GiB less GPU memory for an 8B-shaped draft per rank, at the cost of host traffic
    # and a CPU AdamW step every optimizer step (benchmarks/RESULTS.md)
    cpu_offload: bool = False
    draft_overrides: dict[str, Any] = field(default_factory=dict)  # DraftConfig fields to change (intermediate_size)
    # ---- optimisation ----
    steps: int | None = None       # optimizer steps; None = `epochs` passes over the training rows (with_step_count)
    epochs: float = 1.0            # passes over the training rows when `steps` is None (fractions allowed)
    # peak learning rate (AdamW): the best by validation for SmolLM2's 1-layer draft on the first 4,420 ShareGPT
    # records (benchmarks/RESULTS.md, "Acceptance"; 2e-3 on the whole set); 8B-shaped drafts were not tuned
    lr: float = 1.6e-3
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 50         # linear warm-up from ~0 to lr
    weight_decay: float = 0.0      # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 0.5         # max global grad norm (0 = off)
    # ---- bookkeeping ----
    log_every: int = 10            # steps between log lines (rank 0, JSONL, TensorBoard, W&B)
    eval_every: int = 200          # steps between validation passes (0 = only at the end)
    ckpt_every: int = 500          # steps between checkpoints (0 = only at the end)
    keep_ckpts: int = 2            # keep the latest k complete checkpoints
    resume: bool = False           # continue from the latest complete checkpoint in `output`
    export: bool = True            # write the vLLM/SGLang folder to `output/export` at the end
    device: str | None = None      # cuda | cpu; None = cuda when available
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # ---- more of train.advanced (ADVANCED names every field conf/train.yaml keeps there) ----
    pad_multiple: int = 64         # micro-batch length rounded up to this: few distinct shapes; tests use 16
    peak_tflops: float | None = None  # MFU denominator for devices missing from metrics.PEAK_BF16_FLOPS

    def __post_init__(self) -> None:
        if isinstance(self.wandb, dict):
            self.wandb = WandbConfig(**self.wandb)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        positive = ("batch_rows", "grad_accum", "pad_multiple", "ttt_steps", "log_every", "keep_ckpts",
                    "sequence_parallel")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{setting(name)} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and int(self.steps) < 1:
            raise ValueError(f"train.steps must be >= 1 or null (= train.epochs passes), got {self.steps}")
        if self.max_tokens is not None and int(self.max_tokens) < 1:
            raise ValueError(f"train.max_tokens must be >= 1 or null (= the shards' max_length), got "
                             f"{self.max_tokens}")
        if not self.epochs > 0:
            raise ValueError(f"train.epochs must be > 0, got {self.epochs}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "val_max_rows"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{setting(name)} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"train.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.lr must be > 0 and train.advanced.min_lr_ratio in [0, 1], got {self.lr}, "
                             f"{self.min_lr_ratio}")
        if self.param_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"train.param_dtype must be bfloat16 or float32, got {self.param_dtype!r}")
        if self.device not in (None, "cuda", "cpu"):
            raise ValueError(f"train.device must be cuda, cpu or null, got {self.device!r}")
        if self.activation_checkpointing not in (True, False, "auto"):
            raise ValueError(f"train.activation_checkpointing must be true, false or auto, got "
                             f"{self.activation_checkpointing!r}")
        if not 0.0 < self.step_decay <= 1.0:
            raise ValueError(f"train.advanced.step_decay must be in (0, 1], got {self.step_decay}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from the resolved `train:` section (its `advanced:` block folded in); unknown keys are a ValueError
        naming them."""
        d = merge_advanced(d, "train")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train.* settings: {unknown}; known: {sorted(known)}")
        return cls(**d)

    def with_row_length(self, manifest: dict[str, Any]) -> "TrainConfig":
        """This config with `max_tokens` set: as configured, or (None) the `max_length` stage 2 cut the
        conversations to (its manifest), so a row holds the longest conversation whole."""
        if self.max_tokens is not None:
            return self
        if not manifest.get("max_length"):
            raise ValueError(f"{self.input}/manifest.json records no max_length (shards of an older stage 2): set "
                             "train.max_tokens")
        return dataclasses.replace(self, max_tokens=int(manifest["max_length"]))

    def with_step_count(self, micro_batches_per_epoch: int) -> "TrainConfig":
        """This config with `steps` set: as configured, or (None) `epochs` passes over the training rows, each
        `micro_batches_per_epoch` (the loader's, per rank) // `grad_accum` optimizer steps, at least 1."""
        if self.steps is not None:
            return self
        return dataclasses.replace(self, steps=max(1, int(self.epochs * micro_batches_per_epoch) // self.grad_accum))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d
