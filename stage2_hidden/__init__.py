"""Stage 2: capture the target's aux-layer hidden states and top-1 tokens into Arrow shards.

Entry point: ``python -m stage2_hidden`` (conf/hidden.yaml); reader for stage 3: ``stage2_hidden.reader``.
"""
