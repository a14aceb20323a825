"""Training metrics: the formulas (acceptance length, FLOPs, MFU) and the sinks (stdout, JSONL, TensorBoard, W&B,
a final PNG). Only rank 0 writes; other ranks get a logger whose methods do nothing.
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from common.logs import get_logger

log = get_logger("stage3")

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring; MFU is reported against these unless
# train.advanced.peak_tflops is set (datasheet peaks; an H100/H200 reaches ~780 TFLOP/s on large bf16 matmuls).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "B200": 2250e12}


def acceptance_length(acc: Sequence[float]) -> float:
    """Simulated mean accepted length of greedy chain drafting with k = len(acc) draft tokens.

    Draft token j (0-based) is accepted only if tokens 0..j all are, so with per-TTT-step accuracies acc_i
    (step i's accuracy on the draft's own earlier outputs, used as the conditional acceptance rate):
        E[accepted drafts] = sum_{j=0}^{k-1} prod_{i=0}^{j} acc_i
    and every verification step also yields the target's bonus token, so the length is 1 + that sum.
    E.g. acc = [0.8, 0.7] -> 1 + 0.8 + 0.56 = 2.36.
    """
    total, run = 1.0, 1.0
    for a in acc:
        run *= float(a)
        total += run
    return total


@dataclass
class StepStats:
    """Named sums of the training statistics, over micro-batches and (after `all_reduce`) over ranks.

    ce_sum / correct / valid: [k] float64 per TTT step (summed CE, argmax hits, labelled positions);
    tokens: non-padding tokens; sq_tokens: sum of squared conversation lengths (attention FLOPs). All on the compute
    device (no host sync until `summarize`). Crossing ranks they travel as ONE flat [3k + 2] tensor."""
    ce_sum: torch.Tensor
    correct: torch.Tensor
    valid: torch.Tensor
    tokens: torch.Tensor     # 0-d float64
    sq_tokens: torch.Tensor  # 0-d float64

    @staticmethod
    def zeros(k: int, device: torch.device | str) -> "StepStats":
        z = torch.zeros(3 * k + 2, dtype=torch.float64, device=device)
        return StepStats.from_flat(z, k)

    @staticmethod
    def from_flat(flat: torch.Tensor, k: int) -> "StepStats":
        """The inverse of `flat()`: [ce(k), correct(k), valid(k), tokens, sq_tokens] (views, no copy)."""
        return StepStats(flat[:k], flat[k:2 * k], flat[2 * k:3 * k], flat[3 * k], flat[3 * k + 1])

    @property
    def k(self) -> int:
        return self.ce_sum.numel()

    def flat(self) -> torch.Tensor:
        return torch.cat([self.ce_sum, self.correct, self.valid, self.tokens.reshape(1), self.sq_tokens.reshape(1)])

    def __add__(self, other: "StepStats") -> "StepStats":
        return StepStats.from_flat(self.flat() + other.flat(), self.k)

    def all_reduce(self) -> "StepStats":
        """Sum over all ranks (one collective)."""
        import torch.distributed as dist

        flat = self.flat()
        dist.all_reduce(flat)
        return StepStats.from_flat(flat, self.k)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.ce_sum).all())

    def summarize(self, decay: float) -> dict[str, Any]:
        """-> loss = sum_i decay^i ce_i / valid_i, per-step accuracy correct_i / valid_i, acceptance length."""
        valid = self.valid.clamp(min=1)
        acc = (self.correct / valid).tolist()
        loss = float(sum(decay ** i * (self.ce_sum[i] / valid[i]) for i in range(self.k)))
        return {"loss": loss, "acc": acc, "accept_len": acceptance_length(acc), "valid": self.valid.tolist()}


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU: the configured value, else a table lookup on CUDA; None = unknown."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def format_line(step: int, total: int, m: dict[str, Any]) -> str:
    """The fixed-format rank-0 log line (torchtitan MetricsProcessor style)."""
    acc = " ".join(f"{a:.3f}" for a in m["acc"])
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    eta = str(datetime.timedelta(seconds=int(m.get("eta_s", 0))))
    return (f"step {step:>6}/{total} | loss {m['loss']:.4f} | acc {acc} | accept {m['accept_len']:.2f} | "
            f"lr {m['lr']:.2e} | gnorm {m.get('grad_norm', float('nan')):.3f} | {m['tokens_per_s']:,.0f} tok/s | "
            f"mfu {mfu} | mem {m['peak_mem_gib']:.2f} GiB | eta {eta}")


class MetricsLogger:
    """JSONL + TensorBoard (+ W&B) sink on rank 0; `enabled=False` on other ranks makes every call a no-op."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int | None = None,
                 wandb_cfg: Any = None, config: dict[str, Any] | None = None):
        self.enabled, self.run_dir = enabled, Path(run_dir)
        self.jsonl, self.tb, self.wandb = self.run_dir / "metrics.jsonl", None, None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a project dependency; a bare GPU image may lack it
            log.warning("tensorboard is not installed; writing metrics.jsonl only")
        else:
            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        if wandb_cfg is not None and getattr(wandb_cfg, "project", None):
            try:
                import wandb
            except ImportError:
                log.warning("train.wandb.project is set but wandb is not installed; skipping W&B")
            else:
                self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or self.run_dir.name,
                                        entity=wandb_cfg.entity, config=config, resume="allow")

    def _truncate(self, resume_step: int | None) -> None:
        """On resume keep only records up to the checkpoint's step (later ones are recomputed)."""
        if not self.jsonl.is_file():
            return
        if resume_step is None:
            self.jsonl.unlink()
            return
        keep = [ln for ln in self.jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        self.jsonl.write_text("".join(ln + "\n" for ln in keep))

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` (floats, or lists of floats for per-TTT-step values) under `kind` (train | val)."""
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        flat = {}
        for k, v in metrics.items():
            if isinstance(v, (list, tuple)):
                flat.update({f"{k}_{i}": x for i, x in enumerate(v)})
            elif isinstance(v, (int, float)) and math.isfinite(v):
                flat[k] = v
        if self.tb is not None:
            for k, v in flat.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in flat.items()}, step=step)

    def close(self) -> Path | None:
        """Flush the sinks and draw `curves.png`; returns its path."""
        if not self.enabled:
            return None
        self.enabled = False  # idempotent
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return plot_curves(self.jsonl, self.run_dir / "curves.png")


def plot_curves(jsonl: Path, png: Path) -> Path | None:
    """Loss and per-TTT-step accuracy, train and validation, from metrics.jsonl (covers resumed runs too)."""
    try:
        import matplotlib
    except ImportError:  # a project dependency; a bare GPU image may lack it
        log.warning("matplotlib is not installed; no curves.png")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(jsonl).is_file():
        return None
    records = [json.loads(ln) for ln in Path(jsonl).read_text().splitlines() if ln]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, style in (("train", "-"), ("val", "o--")):
        rs = [r for r in records if r["kind"] == kind]
        if not rs:
            continue
        steps = [r["step"] for r in rs]
        ax_loss.plot(steps, [r["loss"] for r in rs], style, label=kind)
        for i in range(len(rs[0]["acc"])):
            ax_acc.plot(steps, [r["acc"][i] for r in rs], style, color=f"C{i}",
                        label=f"{kind} step {i}" if kind == "train" or i == 0 else None)
    ax_loss.set(xlabel="step", ylabel="loss (sum_i 0.8^i CE_i)", title="loss")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="accuracy per TTT step (dashed: val)", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
