"""Speculative decoding with an HF target and an EAGLE-3 draft, exact under greedy decoding (offline evaluation).

One round (gpt-fast `speculative_decode`, EAGLE-2/3 trees), with T tokens in the target's KV cache and the pending
token x0 (the target's greedy choice after them, not yet fed to it):

    draft    a tree of M draft tokens: node i has a parent (-1 = x0) and a depth; a chain of k tokens is the tree
             with parents [-1, 0, 1, ..., k-2] (top-1 at every depth)
    verify   ONE target forward over [x0, node_1..node_M] at positions T + [0, depth_1..depth_M] with a tree mask
             (each row sees the cache, itself and its ancestors) -> greedy g_j at every row j
    accept   walk from x0: while a child of the current row carries the token g_current, step into it; the
             accepted path p_1..p_n plus the bonus token g_last are exactly what greedy decoding would emit
             -> n + 1 new tokens for this target forward (the acceptance length)
    keep     the target cache keeps rows T + [0, p_1..p_n]; their aux hidden states go to the draft

Draft side (vLLM's eagle3 proposer): verified row p carries fc(aux features of token p) and embeds token p+1, at
RoPE position p, and its keys/values stay in the draft's KV cache. Guess j+1 (j >= 1) reads the draft's pre-norm
output of guess j plus the embedding of guess j, at position last_row + j, attending to the verified rows and to
its ancestors' draft rows: exactly the keys `ttt.py` trains step j against. Draft ids map to target ids through
d2t (target = d + d2t[d]). Tree drafting is EAGLE-2's / SGLang's `speculative_eagle_topk`: expand the top-k
children of each of the top-k frontier nodes per depth, score = sum of draft log-probs along the path, verify the
M best-scoring nodes (an ancestor never scores below its child, so the set is a tree).

The target's aux features are captured by forward pre-hooks on the aux layers (id j = HF hidden_states[j] = the
input of decoder layer j); the target never returns all hidden states and only k+1 rows of logits exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common.hf_target import AuxCapture, use_attention

from stage3_train.model import Eagle3Draft

ATTN = "eagle3_eval_masked"


def _masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, spec_mask=None,
                      **kwargs):
    """HF attention function: SDPA with our own bool mask `spec_mask` [q, kv] (True = attend) instead of HF's."""
    assert spec_mask is not None, "the evaluation target must be called with spec_mask"
    return sdpa_attention_forward(module, query, key, value, spec_mask[None, None], dropout=dropout,
                                  scaling=scaling, is_causal=False)


@dataclass
class DraftTree:
    """M draft nodes in topological order (parent index < own index): target token ids and parents (-1 = x0)."""
    tokens: list[int]
    parents: list[int]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or any(not -1 <= p < i for i, p in enumerate(self.parents)):
            raise ValueError(f"bad draft tree: parents {self.parents} must satisfy -1 <= parent < index")

    @staticmethod
    def chain(tokens: list[int]) -> "DraftTree":
        return DraftTree(list(tokens), list(range(-1, len(tokens) - 1)))

    def depths(self) -> list[int]:
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return depth

    def ancestor_mask(self) -> torch.Tensor:
        """bool [M+1, M+1] over rows [x0, node_1..node_M]: row r sees row c iff c is r or an ancestor of r."""
        M = len(self.tokens)
        mask = torch.zeros(M + 1, M + 1, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            mask[i + 1] = mask[p + 1]
            mask[i + 1, i + 1] = True
        return mask


def accept_path(tree: DraftTree, greedy: list[int]) -> tuple[list[int], int]:
    """(accepted node indices p_1..p_n, bonus token): greedy[r] is the target's choice after row r ([x0, nodes])."""
    children: dict[int, dict[int, int]] = {}
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
        children.setdefault(p, {}).setdefault(tok, i)  # first sibling wins if a drafter repeats a token
    path, row = [], -1
    while (nxt := children.get(row, {}).get(greedy[row + 1])) is not None:
        path.append(nxt)
        row = nxt
    return path, greedy[row + 1]


@dataclass
class TreeSpec:
    """How much to draft per round. topk == 1 and num_nodes == depth: a chain of `depth` tokens."""
    depth: int                    # draft steps (chain length k)
    topk: int = 1                 # children per expanded node and frontier width (SGLang speculative_eagle_topk)
    num_nodes: int | None = None  # nodes verified per round (None: depth for chains, depth * topk for trees)

    def __post_init__(self) -> None:
        if self.depth < 1 or self.topk < 1:
            raise ValueError(f"draft depth and topk must be >= 1, got depth={self.depth} topk={self.topk}")
        if self.num_nodes is None:
            self.num_nodes = self.depth * self.topk
        max_nodes = self.topk + (self.depth - 1) * self.topk * self.topk
        if not 1 <= self.num_nodes <= max_nodes:
            raise ValueError(f"num_nodes must be in [1, {max_nodes}] for depth={self.depth} topk={self.topk}, "
                             f"got {self.num_nodes}")

    @property
    def name(self) -> str:
        return f"chain-k{self.depth}" if self.topk == 1 else f"tree-d{self.depth}-top{self.topk}-n{self.num_nodes}"


class Drafter(Protocol):
    def reset(self) -> None: ...
    def extend(self, aux_nW: torch.Tensor, next_ids: list[int], start: int) -> None: ...
    def propose(self, spec: TreeSpec) -> DraftTree: ...


class TargetModel:
    """An HF causal LM with a KV cache, aux-layer pre-hooks and masked (tree) forwards."""

    def __init__(self, model, layer_ids: list[int]):
        layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"offline evaluation supports full-attention targets only; this one has layer types "
                             f"{sorted(set(layer_types))} (sliding windows / sinks): measure it with bench-serve")
        self.model = model.eval().requires_grad_(False)
        use_attention(self.model, ATTN, _masked_attention)
        self.aux = AuxCapture(self.model, layer_ids)
        self.layer_ids = self.aux.layer_ids
        self.cache = None

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def forward(self, ids: list[int], positions: list[int], mask_nn: torch.Tensor,
                logits_rows: slice = slice(None)) -> tuple[list[int], torch.Tensor]:
        """Feed n new tokens; row r sees the whole cache plus the new rows mask_nn[r]. Returns the greedy tokens of
        `logits_rows` and the aux features [n, num_aux * H] of every new row."""
        past, n = self.length, len(ids)
        mask = torch.cat([torch.ones(n, past, dtype=torch.bool), mask_nn], dim=1).to(self.device)
        self.aux.clear()
        out = self.model.model(input_ids=torch.tensor([ids], device=self.device),
                               position_ids=torch.tensor([positions], device=self.device),
                               past_key_values=self.cache, use_cache=True, spec_mask=mask)
        last_nH = out.last_hidden_state[0, logits_rows]
        # logits only for `logits_rows` (the prompt's last row in prefill): never [T, V]
        greedy = self.model.get_output_embeddings()(last_nH).argmax(-1).tolist()
        aux_nW = torch.cat([a[0] for a in self.aux.pop()], dim=-1)
        return greedy, aux_nW

    def prefill(self, prompt: list[int]) -> tuple[int, torch.Tensor]:
        """(x0 = greedy token after the prompt, aux features [T, W] of the prompt)."""
        self.reset()
        T = len(prompt)
        greedy, aux = self.forward(prompt, list(range(T)), torch.ones(T, T, dtype=torch.bool).tril(),
                                   logits_rows=slice(T - 1, T))
        return greedy[0], aux

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only cache rows `rows` (long [L], increasing) in every layer."""
        rows = rows.to(self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, rows)
            layer.values = layer.values.index_select(-2, rows)


@dataclass
class SpecResult:
    tokens: list[int]                                   # generated tokens (equal to greedy decoding)
    accepted: list[int] = field(default_factory=list)   # accepted draft tokens per verification round
    drafted: list[int] = field(default_factory=list)    # draft nodes verified per round


@torch.inference_mode()
def speculative_generate(target: TargetModel, drafter: Drafter, prompt: list[int], max_new_tokens: int,
                         spec: TreeSpec, eos_ids: set[int] | frozenset[int] = frozenset()) -> SpecResult:
    """Greedy generation of up to `max_new_tokens` tokens (stopping after an eos id), drafted by `drafter`."""
    if not prompt or max_new_tokens < 1:
        raise ValueError(f"need a non-empty prompt and max_new_tokens >= 1, got {len(prompt)} / {max_new_tokens}")
    x0, aux = target.prefill(prompt)
    result = SpecResult([x0])
    drafter.reset()
    drafter.extend(aux, prompt[1:] + [x0], start=0)
    while len(result.tokens) < max_new_tokens and result.tokens[-1] not in eos_ids:
        tree = drafter.propose(spec)
        T = target.length
        positions = [T] + [T + d for d in tree.depths()]
        greedy, aux = target.forward([x0] + tree.tokens, positions, tree.ancestor_mask())
        path, bonus = accept_path(tree, greedy)
        result.accepted.append(len(path))
        result.drafted.append(len(tree.tokens))
        rows = torch.tensor([0] + [i + 1 for i in path])           # x0 and the accepted nodes
        target.keep(torch.cat([torch.arange(T), T + rows]))
        new = [tree.tokens[i] for i in path] + [bonus]
        for tok in new:
            if len(result.tokens) >= max_new_tokens or result.tokens[-1] in eos_ids:
                return result
            result.tokens.append(tok)
        drafter.extend(aux[rows.to(aux.device)], new, start=T)
        x0 = bonus
    return result


class Eagle3Drafter:
    """Draft-side KV cache and tree/chain proposals for an `Eagle3Draft` (see the module docstring)."""

    def __init__(self, draft: Eagle3Draft):
        self.draft = draft.eval().requires_grad_(False)
        self.device = draft.fc.weight.device
        self._d2t = draft.d2t.tolist()
        self.reset()

    def reset(self) -> None:
        self.cache = self.draft.new_kv_cache()   # draft rows: verified positions, then this round's guesses
        self.num_verified = 0           # rows 0..num_verified-1 of the cache hold verified positions
        self.last_hidden_H = None       # pre-norm output of the last verified row
        self.last_logits_V = None       # its draft-vocab logits

    def step(self, hidden_NH: torch.Tensor, ids_N: torch.Tensor, pos_N: torch.Tensor, mask_NR: torch.Tensor,
             project: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft layer over N new rows appended to the cache; row r sees cache rows where mask_NR[r] (R =
        cache rows after the append). Returns (pre-norm output [N, H], draft logits [N, Vd]): the training
        forward `Eagle3Draft.forward`, with the KV cache in place of TTT's diagonal keys."""
        st = self.draft(hidden_NH, ids_N, pos_N, None, project=project, kv_cache=self.cache, attn_mask=mask_NR)
        return st.hidden, self.draft.compute_logits(st.normed)

    def extend(self, aux_nW: torch.Tensor, next_ids: list[int], start: int) -> None:
        """Verified rows start..start+n-1: aux features of tokens at those positions, `next_ids` the tokens after
        them. Drops every draft row at or after `start` (guesses of the last round) first."""
        n = len(next_ids)
        if aux_nW.shape[0] != n or start > self.num_verified:
            raise ValueError(f"extend: {aux_nW.shape[0]} feature rows for {n} tokens at {start} "
                             f"(verified {self.num_verified})")
        self.cache.truncate(start)
        # causal: new row i sees rows 0..start+i
        mask_nR = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
        out_nH, logits_nV = self.step(aux_nW.to(self.device), torch.tensor(next_ids, device=self.device),
                                      torch.arange(start, start + n, device=self.device), mask_nR, project=True)
        self.num_verified = start + n
        self.last_hidden_H, self.last_logits_V = out_nH[-1], logits_nV[-1]

    def propose(self, spec: TreeSpec) -> DraftTree:
        """EAGLE-2 style tree (a chain when topk == 1) grown from the last verified row."""
        K, R0 = spec.topk, self.num_verified
        d2t = self.draft.d2t
        logp_V = torch.log_softmax(self.last_logits_V.float(), -1)
        score_K, tok_K = logp_V.topk(K)
        # pool of candidate nodes: draft token, parent pool index, score, depth
        pool_tok, pool_parent = tok_K.tolist(), [-1] * K
        pool_score, pool_depth = score_K.tolist(), [1] * K
        frontier = list(range(K))                                   # pool indices to expand next
        hidden_FH = self.last_hidden_H[None].expand(K, -1)          # hidden input of each frontier node
        row_of: dict[int, int] = {}                                 # pool index -> its draft cache row
        for depth in range(1, spec.depth):
            F_ = len(frontier)
            R = len(self.cache)
            mask_FR = torch.zeros(F_, R + F_, dtype=torch.bool)
            mask_FR[:, :R0] = True
            for f, node in enumerate(frontier):
                row_of[node] = R + f
                anc = node
                while anc >= 0:                                      # itself and its ancestors' rows
                    mask_FR[f, row_of[anc]] = True
                    anc = pool_parent[anc]
            ids_F = torch.tensor([pool_tok[n] for n in frontier], device=self.device)
            pos_F = torch.full((F_,), R0 - 1 + depth, device=self.device)
            out_FH, logits_FV = self.step(hidden_FH, ids_F + d2t[ids_F], pos_F, mask_FR, project=False)
            logp_FK, tok_FK = torch.log_softmax(logits_FV.float(), -1).topk(K, dim=-1)
            logp_FK = logp_FK.clamp(max=0.0)                          # a child never outscores its parent
            cand_FK = torch.tensor([pool_score[n] for n in frontier], device=logp_FK.device)[:, None] + logp_FK
            base = len(pool_tok)
            pool_tok += tok_FK.flatten().tolist()
            pool_parent += [n for n in frontier for _ in range(K)]
            pool_score += cand_FK.flatten().tolist()
            pool_depth += [depth + 1] * (F_ * K)
            best = cand_FK.flatten().topk(min(K, F_ * K)).indices
            frontier = [base + int(b) for b in best]
            hidden_FH = out_FH[best // K]
        return self._select(spec.num_nodes, pool_tok, pool_parent, pool_score, pool_depth)

    def _select(self, num_nodes, pool_tok, pool_parent, pool_score, pool_depth) -> DraftTree:
        """The `num_nodes` best-scoring pool nodes (ties: shallower first, so parents precede children), in
        topological order, as target ids."""
        order = sorted(range(len(pool_tok)), key=lambda i: (-pool_score[i], pool_depth[i], i))[:num_nodes]
        order.sort(key=lambda i: (pool_depth[i], i))
        index = {p: j for j, p in enumerate(order)}
        tokens = [pool_tok[i] + self._d2t[pool_tok[i]] for i in order]
        parents = [index[pool_parent[i]] if pool_parent[i] >= 0 else -1 for i in order]
        return DraftTree(tokens, parents)
