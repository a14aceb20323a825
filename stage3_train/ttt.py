"""Training-time test (TTT): k unrolled draft steps, each on the draft's own previous hidden output.

Index arithmetic (one packed row; t = token index, all indices inside the row):

    input_ids[t]   token t
    hidden[t]      the target's aux features after reading tokens 0..t
    target_ids[t]  the target's argmax at t = its prediction of token t+1

    step 0 at t:   hidden input  fc(hidden[t])
                   token input   input_ids[t+1]
                   label         target_ids[t+1]          (the target's prediction of token t+2)
    step i at t:   hidden input  the draft's pre-norm output of step i-1 at t
                   token input   input_ids[t+1+i]
                   label         target_ids[t+1+i]        (the target's prediction of token t+2+i)
                   valid iff     t+2+i < T, doc_ids[t+2+i] == doc_ids[t] >= 0  (same conversation, not padding),
                                 loss_mask[t+2+i]          (the predicted token is an assistant token),
                                 t2d[target_ids[t+1+i]]    (the label is in the draft vocabulary)

So step i at t plays the draft's (i+1)-th guess when the target has accepted tokens up to t+1: it has seen the
target features up to t and its own guesses since. Contiguous conversations make doc_ids[t+2+i] == doc_ids[t]
imply every token in between is in the same conversation.

Attention at step i (see attention.py): query t attends to step-0 keys 0..t of its conversation plus the diagonal
keys of steps 1..i at t — at inference those are the KV-cache entries of the verified context and of the draft's
own earlier guesses.

RoPE positions (a documented choice): step i uses position_ids + i. vLLM's EAGLE proposer and SGLang's draft worker
both do `positions += 1` per draft step, so the query and key of the (i+1)-th guess sit at position p+i, while the
context keys keep their own positions; training with the same offsets gives the same relative distances as
serving (t+i-s to context key s, i-j to the guess of step j). SpecForge trains the same way: its draft attention
rotates step i's query and key at `position_ids + lck`, lck = the number of TTT steps already cached = i
(specforge/modeling/draft/llama3_eagle.py, LlamaAttention.forward), as the EAGLE reference it derives from does.
`shift_positions=False` (every step at step 0's positions) reproduces no reference and no engine; it is an
ablation only.

Loss = sum_i step_weights[i] * sum_t CE_i(t) over valid positions (the trainer passes
step_weights[i] = 0.8**i / all_reduce(valid_i)); accuracy counts argmax == label over valid positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stage3_train.attention import Segments
from stage3_train.loss import IGNORE, HeadGrad


@dataclass
class PackedBatch:
    input_ids: torch.Tensor     # [B, T] long
    hidden: torch.Tensor        # [B, T, num_aux * H_t] target features (bf16)
    target_ids: torch.Tensor    # [B, T] long: target argmax at t (its prediction of token t+1)
    loss_mask: torch.Tensor     # [B, T] bool: token t is an assistant token
    position_ids: torch.Tensor  # [B, T] long, restarting at 0 per conversation
    doc_ids: torch.Tensor       # [B, T] int: conversation index within the row, -1 = padding

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"input_ids must be [B, T], got {shape}")
        for name in ("target_ids", "loss_mask", "position_ids", "doc_ids"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"PackedBatch.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if tuple(self.hidden.shape[:2]) != shape or self.hidden.dim() != 3:
            raise ValueError(f"PackedBatch.hidden must be [B, T, 3H] with [B, T]={shape}, got {tuple(self.hidden.shape)}")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(*(getattr(self, f).to(device, non_blocking=non_blocking) for f in
                             ("input_ids", "hidden", "target_ids", "loss_mask", "position_ids", "doc_ids")))


@dataclass
class TTTOutput:
    loss: torch.Tensor      # scalar: sum_i step_weights[i] * ce_sum[i] (differentiable)
    ce_sum: torch.Tensor    # [k] fp32 sum of CE over valid positions (detached)
    correct: torch.Tensor   # [k] int64 argmax == label over valid positions
    valid: torch.Tensor     # [k] int64 number of valid positions


def _shift_left(x_BT: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """y[:, t] = x[:, t+n], `fill` past the end."""
    return F.pad(x_BT[:, n:], (0, min(n, x_BT.shape[1])), value=fill)


def _extended(batch: PackedBatch, halo: dict[str, torch.Tensor] | None):
    """(input_ids, target_ids, loss_mask, doc_ids) [B, T+H]: the batch followed by a sequence-parallel halo (the
    H tokens after this rank's slice, sequence_parallel.py); the batch itself without one."""
    names = ("input_ids", "target_ids", "loss_mask", "doc_ids")
    if halo is None:
        return tuple(getattr(batch, n) for n in names)
    return tuple(torch.cat([getattr(batch, n), halo[n].to(getattr(batch, n).dtype)], dim=1) for n in names)


def valid_mask(batch: PackedBatch, ttt_steps: int, t2d: torch.Tensor,
               halo: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """bool [k, B, T]: position t of step i has a label (see the module docstring for the arithmetic).

    halo: the next tokens after a sequence-parallel slice (their ids/targets/mask/doc ids decide the labels of the
    last k+1 positions); None = the row ends at T."""
    B, T = batch.input_ids.shape
    _, target_ids, loss_mask, doc = _extended(batch, halo)
    Te = doc.shape[1]
    valid = torch.zeros(ttt_steps, B, T, dtype=torch.bool, device=batch.input_ids.device)
    mask = loss_mask.bool()
    for i in range(ttt_steps):
        s = i + 2                                  # offset of the predicted token
        if s >= Te:
            break
        n = min(T, Te - s)
        same_doc = (doc[:, :n] == doc[:, s:s + n]) & (doc[:, :n] >= 0)
        label = target_ids[:, 1 + i:1 + i + n].long()
        valid[i, :, :n] = same_doc & mask[:, s:s + n] & t2d[label]
    return valid


def ttt_forward(model, batch: PackedBatch, step_weights: torch.Tensor, ttt_steps: int, checkpoint: bool = True,
                *, shift_positions: bool = True, loss_chunk: int | None = None, sp=None) -> TTTOutput:
    """Run k TTT steps of `model` (an Eagle3Draft, possibly FSDP-wrapped: only its forward is called) on `batch`.

    sp: a `sequence_parallel.SequenceShard` when `batch` is this rank's slice of longer rows (its halo supplies the
    shifted tokens/labels past the slice, its segments attend across ranks); None = whole rows."""
    if ttt_steps < 1:
        raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
    if step_weights.shape != (ttt_steps,):
        raise ValueError(f"step_weights must have shape [{ttt_steps}], got {tuple(step_weights.shape)}")
    B, T = batch.input_ids.shape
    halo = None if sp is None else sp.halo
    segments = Segments.from_doc_ids(batch.doc_ids) if sp is None else sp.segments
    valid_kBT = valid_mask(batch, ttt_steps, model.t2d, halo)
    input_ids, target_ids = _extended(batch, halo)[:2]
    to_draft_V = model.target_to_draft()
    hidden = batch.hidden.reshape(B * T, -1)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    loss = torch.zeros((), device=hidden.device)
    ce_sums, corrects = [], []
    head_grad = HeadGrad()  # one fp32 lm_head grad buffer for the k steps (their losses are summed below)
    weights = step_weights.detach().double().cpu().tolist()
    for i in range(ttt_steps):
        ids_N = _shift_left(input_ids, 1 + i, fill=0)[:, :T].reshape(-1)
        label_BT = to_draft_V[_shift_left(target_ids.long(), 1 + i, fill=0)[:, :T]]
        labels_N = torch.where(valid_kBT[i], label_BT, IGNORE).reshape(-1)
        pos_N = (batch.position_ids + i if shift_positions else batch.position_ids).reshape(-1)
        step = model(hidden, ids_N, pos_N, segments, (tuple(keys), tuple(values)), labels_N,
                     project=(i == 0), checkpoint=checkpoint, loss_weight=weights[i], head_grad=head_grad,
                     loss_chunk=loss_chunk)
        hidden = step.hidden
        keys.append(step.k)
        values.append(step.v)
        loss = loss + step.loss
        ce_sums.append(step.ce_sum.float())
        corrects.append(step.correct)
    return TTTOutput(loss, torch.stack(ce_sums), torch.stack(corrects), valid_kBT.sum((1, 2)))
