"""Evaluation of a trained draft: acceptance length offline (HF target + draft, exact greedy speculative decoding)
and served (vLLM with and without `--speculative-config`).

Modules: `prompts` (MT-bench / HumanEval / GSM8K and any stage-1 input; rendered by stage 2's one chat renderer),
`spec_decode` (target with a KV cache and tree-masked verification; the draft's own forward with its KV cache),
`offline` (`make eval`), `serve` (`make bench-serve`), `report` (tables and the acceptance plot).
The export is consumed through `stage3_train.export` and the draft model's public API; the target through
`common.hf_target`.
"""
