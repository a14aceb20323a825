"""The EAGLE-3 draft: one Llama decoder layer over [embedding, hidden], as vLLM and SGLang serve it.

Maths of one draft step (vLLM `llama_eagle3.py`, SGLang `llama_eagle3.py`, SpecForge; `norm_before_residual=False`):

    g_t      = fc(target_aux_hidden_t)            step 0 only: 3 target layers (3*H_t) -> H
    residual = g_t                                (the pre-norm hidden input of the step)
    x_t      = cat[input_layernorm(embed(tok)), hidden_norm(g_t)]          2H: embedding FIRST, then hidden
    a_t      = o_proj(attn(q_proj(x), k_proj(x), v_proj(x)))               RoPE on q/k at the step's positions
    r_t      = a_t + residual
    h_t      = mlp(post_attention_layernorm(r_t)) + r_t                     -> the next step's hidden input
    logits_t = lm_head(norm(h_t))                                           over the draft vocabulary

So the hidden that feeds the next TTT step (and the next draft position when served) is the pre-norm residual
stream `h_t`, and the logits use `norm(h_t)`: vLLM's `LlamaModel.forward` returns `(norm(h), h)` and its proposer feeds
the second one back. A draft id d is target id `d + d2t[d]`; `t2d[v]` says whether target id v is in the draft vocab.

The step works on flat token tensors [N = B*T, ...]. One forward serves both uses (gpt-fast style); only the
attention kernel differs:
  training  packed conversations kept apart by `Segments`, TTT attention over the causal block of step 0 plus the
            diagonal keys of steps 1..i (`cache` = tuples of earlier steps' keys/values, attention.py);
  decoding  a `KVCache` of rows [R, Hkv, D]: the step appends its N rows, then SDPA with an explicit bool mask
            [N, R] (True = attend) over all cache rows (evaluation/spec_decode.py builds chains and trees with it).
RoPE rotates the first `rotary_dim = partial_rotary_factor * head_dim` dims of each head (HF/vLLM, neox halves) and
passes the rest through. No I/O (the target embeddings: target_embeddings.py), no parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from stage3_train.attention import Segments, ttt_attention
from stage3_train.kv_cache import KVCache, cached_attention
from stage3_train import attention as _attention
from stage3_train import loss as _loss
from stage3_train.loss import HeadGrad, linear_cross_entropy


@dataclass
class DraftConfig:
    hidden_size: int                    # H: draft width = target width (the engines share the target's embeddings)
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int              # SwiGLU width (the target's)
    vocab_size: int                     # target vocabulary V (embeddings, t2d)
    draft_vocab_size: int               # Vd: lm_head rows, d2t
    target_hidden_size: int             # H_t: width of each captured target layer (fc input = num_aux_layers * H_t)
    num_aux_layers: int = 3             # target layers concatenated into the fc input
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    hidden_act: str = "silu"
    norm_before_residual: bool = False  # vLLM option: residual = hidden_norm(g) instead of g (some published drafts)
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                     "vocab_size", "draft_vocab_size", "target_hidden_size", "num_aux_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DraftConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} > target vocab_size={self.vocab_size}")
        if self.hidden_act != "silu":
            raise ValueError(f"only SwiGLU (hidden_act='silu') drafts are supported, got {self.hidden_act!r}")
        if "rope_type" not in self.rope_parameters or "rope_theta" not in self.rope_parameters:
            raise ValueError(f"rope_parameters needs rope_type and rope_theta, got {self.rope_parameters}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"partial_rotary_factor={self.rope_parameters.get('partial_rotary_factor')} gives "
                             f"rotary_dim={self.rotary_dim}: must be even and in (0, head_dim={self.head_dim}]")

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones): int(partial_rotary_factor * head_dim), as HF/vLLM."""
        return int(self.head_dim * float(self.rope_parameters.get("partial_rotary_factor", 1.0)))

    @classmethod
    def from_target_config(cls, hf_cfg: dict[str, Any], draft_vocab_size: int | None = None,
                           **overrides: Any) -> "DraftConfig":
        """The draft's shape from the target's HF `config.json` dict (transformers 4 or 5 rope conventions).

        `draft_vocab_size` None = the target vocabulary. `overrides` replace any field (e.g. intermediate_size).
        Multimodal configs with a `text_config` use that.
        """
        cfg = dict(hf_cfg.get("text_config") or hf_cfg)
        missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
                   if cfg.get(k) is None]
        if missing:
            raise ValueError(f"target config lacks {missing}; is this a decoder LLM config.json?")
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
        kw: dict[str, Any] = dict(
            hidden_size=int(cfg["hidden_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=vocab,
            draft_vocab_size=int(draft_vocab_size or vocab),
            target_hidden_size=int(cfg["hidden_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            rope_parameters=rope_parameters_of(cfg),
        )
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown DraftConfig override(s) {bad}; known: {sorted(known)}")
        kw.update(overrides)
        return cls(**kw)


def rope_parameters_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers-5 `rope_parameters` from a config dict: v5 field as is, else v4 `rope_theta` + `rope_scaling`.

    A v4 top-level `partial_rotary_factor` (what the export copies into config.json) moves inside, as transformers 5
    standardises it; one already inside `rope_parameters` wins.
    """
    if isinstance(cfg.get("rope_parameters"), dict) and "rope_theta" in cfg["rope_parameters"]:
        params = dict(cfg["rope_parameters"])
        params.setdefault("rope_type", params.pop("type", "default"))
    else:
        params = dict(cfg.get("rope_scaling") or {})
        params["rope_type"] = params.pop("type", None) or params.get("rope_type") or "default"
        params["rope_theta"] = float(cfg.get("rope_theta", 10000.0))
    if cfg.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", float(cfg["partial_rotary_factor"]))
    return params


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm, computed in fp32 and cast back before the weight (HF and vLLM `forward_native` order)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x_NhD: torch.Tensor, cos_Nr: torch.Tensor, sin_Nr: torch.Tensor) -> torch.Tensor:
    """x_rot * cos + rotate_half(x_rot) * sin on the first r = cos.shape[-1] dims of each head (HF/vLLM neox-style
    halves); the other D - r dims pass through unchanged (partial_rotary_factor < 1)."""
    r = cos_Nr.shape[-1]
    x_rot, x_pass = x_NhD[..., :r], x_NhD[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = x_rot * cos_Nr[:, None] + torch.cat((-x2, x1), dim=-1) * sin_Nr[:, None]
    return out if r == x_NhD.shape[-1] else torch.cat((out, x_pass), dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


MLP_CHUNK_TOKENS = 32768  # rows longer than this run the MLP in checkpointed token chunks
_K = {"rms_norm": rms_norm, "rope": apply_rope, "silu_mul": silu_mul}


def compile_hot_paths() -> None:
    """torch.compile the small elementwise pieces (norms, RoPE, SwiGLU, the attention's diagonal terms, the loss's
    softmax): one fused kernel each on GPU, same maths. Call once before training on CUDA; CPU tests stay eager."""
    for name, fn in list(_K.items()):
        _K[name] = torch.compile(fn, dynamic=True)
    _attention.compile_kernels()
    _loss.compile_kernels()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _K["rms_norm"](x, self.weight, self.eps)


class Rotary(nn.Module):
    """RoPE cos/sin [N, rotary_dim] from transformers' Llama rotary embedding (all rope types: default, llama3, yarn,
    ...). Built for a head of `rotary_dim` dims: HF's default rope ignores partial_rotary_factor, the scaled types
    would take int(head_dim * factor); both give rotary_dim / 2 frequencies over rotary_dim this way."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        params = {k: v for k, v in cfg.rope_parameters.items() if k != "partial_rotary_factor"}
        hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                         head_dim=cfg.rotary_dim, max_position_embeddings=cfg.max_position_embeddings,
                         rope_parameters=params)
        with torch.device("cpu"):  # real inv_freq even when the model is built on the meta device (FSDP2 init)
            self._hf = [LlamaRotaryEmbedding(hf)]  # a list: not a submodule, so no state-dict key, moved lazily

    def forward(self, x: torch.Tensor, position_ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self._hf[0]
        if rope.inv_freq.device != x.device:
            rope.to(x.device)
        cos_1Nr, sin_1Nr = rope(x, position_ids_N[None])
        return cos_1Nr[0], sin_1Nr[0]


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(2 * cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x_N2H: torch.Tensor, cos_Nr: torch.Tensor, sin_Nr: torch.Tensor, segments: Segments | None,
                cache: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]],
                kv_cache: KVCache | None = None, mask_NR: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (o_proj output [N, H], this step's post-RoPE k and v [N, Hkv, D]).

        Training (kv_cache None): `cache` = (keys, values) of the earlier TTT steps: entry 0 is step 0's (the causal
        block), entries 1.. are the diagonal keys of steps 1..i-1. Empty at step 0 (then the step attends causally
        to its own keys). Decoding: k, v are appended to `kv_cache` (R rows after), row n attends where mask_NR[n].
        """
        N = x_N2H.shape[0]
        q_NhD = _K["rope"](self.q_proj(x_N2H).view(N, self.num_heads, self.head_dim), cos_Nr, sin_Nr)
        k_NkD = _K["rope"](self.k_proj(x_N2H).view(N, self.num_kv_heads, self.head_dim), cos_Nr, sin_Nr)
        v_NkD = self.v_proj(x_N2H).view(N, self.num_kv_heads, self.head_dim)
        if kv_cache is None:
            o_NhD = ttt_attention(q_NhD, (*cache[0], k_NkD), (*cache[1], v_NkD), segments)
        else:
            kv_cache.append(k_NkD, v_NkD)
            o_NhD = cached_attention(q_NhD, kv_cache, mask_NR)
        return self.o_proj(o_NhD.reshape(N, -1)), k_NkD, v_NkD


class MLP(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_K["silu_mul"](self.gate_proj(x), self.up_proj(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Long rows: token chunks, each recomputed in backward, so the [N, intermediate] activations exist for one
        # chunk at a time (3 x 14336 x 2 bytes per token would dominate memory at 128K+ tokens).
        if x.shape[0] <= MLP_CHUNK_TOKENS or not torch.is_grad_enabled():
            return self._swiglu(x)
        return torch.cat([activation_checkpoint(self._swiglu, c, use_reentrant=False)
                          for c in x.split(MLP_CHUNK_TOKENS)])


class DecoderLayer(nn.Module):
    """The `midlayer`: a Llama decoder layer whose attention reads 2H = [input_layernorm(embed), hidden_norm(g)]."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.norm_before_residual = cfg.norm_before_residual
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, hidden_NH, embeds_NH, cos_Nr, sin_Nr, segments, cache, kv_cache=None, mask_NR=None):
        normed_NH = self.hidden_norm(hidden_NH)
        residual_NH = normed_NH if self.norm_before_residual else hidden_NH
        x_N2H = torch.cat([self.input_layernorm(embeds_NH), normed_NH], dim=-1)  # embeddings first (vLLM, SGLang)
        attn_NH, k_NkD, v_NkD = self.self_attn(x_N2H, cos_Nr, sin_Nr, segments, cache, kv_cache, mask_NR)
        residual_NH = attn_NH + residual_NH
        out_NH = self.mlp(self.post_attention_layernorm(residual_NH)) + residual_NH
        return out_NH, k_NkD, v_NkD


class DraftStep(NamedTuple):
    hidden: torch.Tensor           # [N, H] pre-norm output: the next TTT step's hidden input
    k: torch.Tensor                # [N, Hkv, D] this step's keys (post-RoPE), for later steps' diagonal terms
    v: torch.Tensor                # [N, Hkv, D]
    normed: torch.Tensor | None    # [N, H] norm(hidden), lm_head input; None when labels were given
    loss: torch.Tensor | None      # scalar fp32: loss_weight * ce_sum (differentiable); None without labels
    ce_sum: torch.Tensor | None    # scalar fp32: sum of CE over labels >= 0 (detached)
    correct: torch.Tensor | None   # scalar int64: argmax == label count (detached)


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft; parameter names are the export's safetensors keys (plus the frozen `embed_tokens`)."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # frozen: the engines share the target's embeddings
        self.fc = nn.Linear(cfg.num_aux_layers * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = DecoderLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        # identity vocabulary until set_vocab: draft id d = target id d
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(cfg.vocab_size) < cfg.draft_vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) linears and embedding, ones for norms (HF Llama init); identity vocab buffers
        (so `to_empty` after a meta-device build leaves nothing uninitialised)."""
        self.d2t.zero_()
        self.t2d.copy_(torch.arange(self.config.vocab_size, device=self.t2d.device) < self.config.draft_vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.config.initializer_range)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @torch.no_grad()
    def set_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install stage 2's draft vocabulary (d2t int64 [Vd], t2d bool [V]) after checking it is consistent."""
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"vocab shapes d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} do not match the draft "
                             f"(draft_vocab_size={self.config.draft_vocab_size}, vocab_size={self.config.vocab_size})")
        target_ids = torch.arange(d2t.numel()) + d2t.cpu()
        if target_ids.min() < 0 or target_ids.max() >= t2d.numel() or not bool(t2d.cpu()[target_ids].all()):
            raise ValueError("d2t maps draft ids outside t2d: the vocab file is inconsistent")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d.bool())

    def target_to_draft(self) -> torch.Tensor:
        """[V] int64: draft id of each target id, -1 where the target id is not in the draft vocabulary."""
        index = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=self.d2t.device)
        draft_ids = torch.arange(self.d2t.numel(), device=self.d2t.device)
        return index.index_copy_(0, draft_ids + self.d2t, draft_ids)

    def new_kv_cache(self, capacity: int = 256) -> KVCache:
        """An empty decoding KVCache for this draft (its device and dtype), grown past `capacity` rows as needed."""
        cfg, w = self.config, self.fc.weight
        return KVCache(cfg.num_key_value_heads, cfg.head_dim, capacity, device=w.device, dtype=w.dtype)

    def _layer(self, hidden_NH, input_ids_N, position_ids_N, segments, cache, kv_cache=None, mask_NR=None):
        embeds_NH = self.embed_tokens(input_ids_N).to(hidden_NH.dtype)
        cos_Nr, sin_Nr = self.rotary(hidden_NH, position_ids_N)
        out_NH, k_NkD, v_NkD = self.midlayer(hidden_NH, embeds_NH, cos_Nr, sin_Nr, segments, cache, kv_cache,
                                             mask_NR)
        return out_NH, self.norm(out_NH), k_NkD, v_NkD

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                segments: Segments | None, cache: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] = ((), ()),
                labels: torch.Tensor | None = None, *, project: bool = False, checkpoint: bool = False,
                loss_weight: float = 1.0, head_grad: HeadGrad | None = None, loss_chunk: int | None = None,
                kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None) -> DraftStep:
        """One draft step over N flat tokens: a TTT training step, or a decoding step with a KV cache.

        hidden: [N, num_aux*H_t] target features when `project` (step 0, goes through fc), else [N, H] (the previous
        step's `DraftStep.hidden`); input_ids [N] the tokens to embed; position_ids [N] RoPE positions; cache: the
        earlier steps' (keys, values), see `Attention.forward`. labels [N] draft ids (-100 = ignored): the step also
        returns loss_weight * (summed CE) through the fused lm_head + cross-entropy (no [N, Vd] logits kept);
        head_grad shares one lm_head grad accumulator between steps whose losses are summed (loss.py).
        checkpoint: recompute the decoder layer in backward (only its inputs are kept).
        Decoding: kv_cache (see `new_kv_cache`) gets this step's N rows appended, then row n attends to the R cache
        rows where attn_mask[n] (bool [N, R], R counted after the append); segments and cache are unused (None, ()).
        """
        if project:
            hidden = self.fc(hidden.to(self.fc.weight.dtype))
        if kv_cache is not None:
            N_R = (hidden.shape[0], len(kv_cache) + hidden.shape[0])
            if attn_mask is None or tuple(attn_mask.shape) != N_R:
                raise ValueError(f"decoding needs a bool attn_mask [N, R] = {list(N_R)}, got "
                                 f"{None if attn_mask is None else tuple(attn_mask.shape)}")
            out_NH, normed_NH, k, v = self._layer(hidden, input_ids, position_ids, None, ((), ()), kv_cache,
                                                  attn_mask.to(device=hidden.device, dtype=torch.bool))
            return self._head(out_NH, normed_NH, k, v, labels, loss_weight, head_grad, loss_chunk)
        cache = (tuple(cache[0]), tuple(cache[1]))  # snapshot: checkpoint recomputes with these exact inputs
        if checkpoint and torch.is_grad_enabled():
            out_NH, normed_NH, k, v = activation_checkpoint(self._layer, hidden, input_ids, position_ids, segments,
                                                            cache, use_reentrant=False)
        else:
            out_NH, normed_NH, k, v = self._layer(hidden, input_ids, position_ids, segments, cache)
        return self._head(out_NH, normed_NH, k, v, labels, loss_weight, head_grad, loss_chunk)

    def _head(self, out_NH, normed_NH, k, v, labels, loss_weight, head_grad, loss_chunk) -> DraftStep:
        if labels is None:
            return DraftStep(out_NH, k, v, normed_NH, None, None, None)
        loss, ce_sum, correct = linear_cross_entropy(normed_NH, self.lm_head.weight, labels, chunk_size=loss_chunk,
                                                     loss_weight=loss_weight, head_grad=head_grad)
        return DraftStep(out_NH, k, v, None, loss, ce_sum, correct)

    def compute_logits(self, normed_NH: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits [N, Vd] (evaluation only: training never materialises them)."""
        return self.lm_head(normed_NH)


def num_flops_per_token(cfg: DraftConfig, ttt_steps: int, context: int) -> float:
    """Training FLOPs per token (fwd + bwd, no recompute): 6 x matmul MACs per step + fc (weight grad only) +
    causal attention (4*D*heads*context/2 fwd, 2.5x that in bwd) per step."""
    H, D = cfg.hidden_size, cfg.head_dim
    qkvo = H * D * (3 * cfg.num_attention_heads + 4 * cfg.num_key_value_heads)  # q,k,v from 2H; o back to H
    macs = qkvo + 3 * H * cfg.intermediate_size + H * cfg.draft_vocab_size
    attn = 3.5 * 4 * D * cfg.num_attention_heads * context / 2
    fc = 4 * cfg.num_aux_layers * cfg.target_hidden_size * H
    return ttt_steps * (6 * macs + attn) + fc
