"""Offline acceptance evaluation (`make eval`): the HF target + the trained draft, greedy speculative decoding.

    python -m evaluation.offline eval.draft=data/train/smollm2-135m/export          (hydra, conf/eval.yaml)
    python -m evaluation.offline eval.datasets=[gsm8k] eval.num_prompts=20 eval.num_speculative_tokens=[3]
    python -m evaluation.offline --plain --target PATH --draft PATH ...            (argparse: GPU stack)

For every dataset and draft shape (chains of k = 3 and 7 by default, optionally a tree) it decodes every prompt
(all turns, each conditioned on the target's own earlier answers) with `spec_decode.speculative_generate`, whose
output is the target's greedy output, and records per verification round the number n of accepted draft tokens:

    acceptance length      = mean over rounds of (1 + n)   (tokens per target forward; vLLM: 1 + accepted/drafts)
    acceptance at pos. i   = share of rounds with n >= i   (vLLM: accepted_per_pos[i-1] / drafts)
    histogram              = count of rounds per n = 0..k

Writes ${eval.output}/acceptance.json (atomically, `complete: true` last) and acceptance.png, and prints a table.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common.entry import dataclass_command
from common.files import atomic_write_json
from common.logs import get_logger

from evaluation.prompts import Prompt, load_prompts, messages_for
from evaluation.spec_decode import Eagle3Drafter, SpecResult, TargetModel, TreeSpec, speculative_generate

log = get_logger("eval")


@dataclass
class EvalConfig:
    target: str = "data/models/SmolLM2-135M-Instruct"  # HF folder (or hub id) of the target
    draft: str = "data/train/smollm2-135m/export"      # export folder, or a step-N checkpoint / run folder
    output: str = "data/eval/smollm2-135m"              # acceptance.json + acceptance.png go here
    datasets: list[str] = field(default_factory=lambda: ["mtbench", "humaneval", "gsm8k"])  # or any stage-1 input
    num_prompts: int | None = None                      # first N prompts of every dataset (None = all)
    limits: dict[str, int] = field(default_factory=lambda: {"gsm8k": 200})  # per-dataset N (under num_prompts)
    turns: str = "all"                                  # all | first (user turns asked per prompt)
    max_new_tokens: int = 256                           # per answer
    num_speculative_tokens: list[int] = field(default_factory=lambda: [3, 7])  # chain drafts of k tokens (bench: k)
    tree_depth: int = 0                                 # > 0: also a tree of this depth ...
    tree_topk: int = 4                                  # ... with this many children / frontier nodes per depth ...
    tree_nodes: int = 16                                # ... verifying this many nodes per round
    layer_ids: list[int] | None = None                  # aux layers; None = the draft's config (default [2,N//2,N-3])
    device: str | None = None                           # cuda | cpu; None = cuda when available
    dtype: str | None = None                            # None = bfloat16 on GPU, float32 on CPU
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("eval.datasets is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.num_speculative_tokens and self.tree_depth <= 0:
            raise ValueError("nothing to evaluate: eval.num_speculative_tokens is empty and eval.tree_depth is 0")
        if any(int(k) < 1 for k in self.num_speculative_tokens):
            raise ValueError(f"eval.num_speculative_tokens entries must be >= 1, got "
                             f"{self.num_speculative_tokens}")
        if self.device not in (None, "cuda", "cpu"):
            raise ValueError(f"eval.device must be cuda, cpu or null, got {self.device!r}")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"eval.advanced.dtype must be bfloat16, float16, float32 or null, got {self.dtype!r}")
        self.specs()  # validates the tree settings

    def specs(self) -> list[TreeSpec]:
        specs = [TreeSpec(int(k)) for k in self.num_speculative_tokens]
        if self.tree_depth > 0:
            specs.append(TreeSpec(self.tree_depth, self.tree_topk, self.tree_nodes))
        return specs

    def limit_for(self, dataset: str) -> int | None:
        caps = [c for c in (self.num_prompts, self.limits.get(dataset)) if c is not None]
        return min(caps) if caps else None


def acceptance_summary(results: list[SpecResult], depth: int) -> dict[str, Any]:
    """Acceptance length, per-position acceptance and the histogram over all verification rounds of `results`."""
    accepted = torch.tensor([a for r in results for a in r.accepted], dtype=torch.long)
    rounds = int(accepted.numel())
    hist = torch.bincount(accepted, minlength=depth + 1)[: depth + 1] if rounds else torch.zeros(depth + 1)
    per_pos = [float((accepted >= i).float().mean()) if rounds else 0.0 for i in range(1, depth + 1)]
    return {"acceptance_length": 1.0 + float(accepted.float().mean()) if rounds else 0.0,
            "per_position": per_pos, "histogram": [int(h) for h in hist], "rounds": rounds,
            "drafted_tokens": sum(sum(r.drafted) for r in results),
            "generated_tokens": sum(len(r.tokens) for r in results), "answers": len(results)}


@torch.no_grad()
def load_draft(spec: str | Path, target_model, device: torch.device, dtype: torch.dtype):
    """(Eagle3Draft on device/dtype, export config.json) from an export folder or a training checkpoint (exported
    to a temporary folder first: evaluated is exactly what vLLM would serve, bf16 weights included). Only
    safetensors and JSON are read: a checkpoint's model.safetensors, never its DCP shards (unpickling runs code),
    and a checkpoint without that file is refused. The frozen embeddings are the loaded target's, as in the
    engines."""
    from stage3_train import export

    spec = Path(spec)
    if (spec / "config.json").is_file():
        config, _ = export.read_export(spec)
        draft = export.draft_from_export(spec)
    elif spec.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            folder = export.export_checkpoint(spec, Path(tmp) / "export")
            config, _ = export.read_export(folder)
            draft = export.draft_from_export(folder)
    else:
        raise ValueError(f"draft {spec} is neither an export folder (config.json) nor a checkpoint folder")
    embed = target_model.get_input_embeddings().weight
    if tuple(embed.shape) != tuple(draft.embed_tokens.weight.shape):
        raise ValueError(f"the target's embeddings {tuple(embed.shape)} do not fit the draft "
                         f"{tuple(draft.embed_tokens.weight.shape)}: the draft was trained for another target")
    draft.embed_tokens.weight.copy_(embed.float().cpu())
    return draft.to(device=device, dtype=dtype).eval(), config


def load_models(cfg: EvalConfig):
    """(TargetModel, tokenizer, Eagle3Drafter, eos ids) as the config says."""
    from transformers import AutoTokenizer

    from common.hf_target import load_target_model

    from stage3_train.export import layer_ids_of

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tokenizer = AutoTokenizer.from_pretrained(cfg.target, trust_remote_code=cfg.trust_remote_code)
    model = load_target_model(cfg.target, dtype, device, trust_remote_code=cfg.trust_remote_code)
    draft, draft_cfg = load_draft(cfg.draft, model, device, dtype)
    layer_ids = cfg.layer_ids or layer_ids_of(draft_cfg, len(model.model.layers))
    if len(layer_ids) != draft.config.num_aux_layers:
        raise ValueError(f"{len(layer_ids)} aux layers {layer_ids}, the draft's fc reads {draft.config.num_aux_layers}")
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return TargetModel(model, list(layer_ids)), tokenizer, Eagle3Drafter(draft), eos_ids


def evaluate_prompts(target: TargetModel, drafter, tokenizer, prompts: list[Prompt], spec: TreeSpec,
                     max_new_tokens: int, eos_ids: set[int], chat_template_kwargs: dict | None = None,
                     desc: str = "") -> dict[str, Any]:
    """Decode every turn of every prompt; the summary of `acceptance_summary` plus timing."""
    from stage2_hidden.render import ChatRenderer

    renderer = ChatRenderer(tokenizer, chat_template_kwargs)  # stage 2's renderer: what the draft trained on
    results: list[SpecResult] = []
    accepted = rounds = 0
    t0 = time.perf_counter()
    bar = tqdm(total=sum(len(p.turns) for p in prompts), desc=desc, unit="answer", dynamic_ncols=True)
    for prompt in prompts:
        answers: list[str] = []
        for _ in prompt.turns:
            ids = renderer.prompt_ids(messages_for(prompt, answers))
            res = speculative_generate(target, drafter, ids, max_new_tokens, spec, eos_ids)
            results.append(res)
            answers.append(tokenizer.decode([t for t in res.tokens if t not in eos_ids], skip_special_tokens=True))
            accepted += sum(res.accepted)
            rounds += len(res.accepted)
            bar.update(1)
            bar.set_postfix(acceptance_length=f"{1 + accepted / max(1, rounds):.3f}")
    bar.close()
    summary = acceptance_summary(results, spec.depth)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    summary["tokens_per_s"] = round(summary["generated_tokens"] / max(summary["wall_s"], 1e-9), 2)
    return summary


def run(cfg: EvalConfig) -> dict[str, Any]:
    from evaluation.report import acceptance_table, plot_acceptance

    target, tokenizer, drafter, eos_ids = load_models(cfg)
    report: dict[str, Any] = {"format": "eagle3-eval/1", "config": dataclasses.asdict(cfg),
                              "layer_ids": target.layer_ids, "results": {}}
    out = Path(cfg.output)
    for dataset in cfg.datasets:
        prompts = load_prompts(dataset, cfg.limit_for(dataset), cfg.turns)
        name = Path(dataset).stem if Path(dataset).exists() else dataset
        report["results"][name] = {"num_prompts": len(prompts)}
        for spec in cfg.specs():
            report["results"][name][spec.name] = evaluate_prompts(target, drafter, tokenizer, prompts, spec,
                                                          cfg.max_new_tokens, eos_ids, cfg.chat_template_kwargs,
                                                          desc=f"{name} {spec.name}")
            atomic_write_json(out / "acceptance.json", {**report, "complete": False})  # partial results survive a crash
    report["plot"] = str(plot_acceptance(report["results"], out / "acceptance.png"))
    atomic_write_json(out / "acceptance.json", {**report, "complete": True})
    print(acceptance_table(report["results"]))
    log.info(f"report {out / 'acceptance.json'}, plot {report['plot']}")
    return report


# argparse CLI (machines without Hydra: every EvalConfig field as --field) and the Hydra entry point
plain_args, main = dataclass_command(EvalConfig, run, "eval", "eval", "evaluation.offline")

if __name__ == "__main__":
    main()
