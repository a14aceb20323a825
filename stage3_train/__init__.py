"""Stage 3: train the EAGLE-3 draft from stage 2's hidden-state shards.

Core (no I/O, no parallelism): `model` (the draft), `ttt` (training-time test), `attention` (O(T)-memory TTT
attention), `loss` (fused linear + cross-entropy). The training loop, FSDP2, checkpoints and export live beside them.
"""
