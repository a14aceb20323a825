"""Stage 1: regenerate a prompt set's answers with the target through an OpenAI-compatible (vLLM) server.

Modules: ``formats`` (any prompt set -> ``{"id", "messages"}``; imported by stage 2, so it stays free of
vLLM / Hydra / HTTP imports; ``json_files`` reads its JSON / JSON-lines files, bad bytes and records skipped one
at a time), the launcher in ``common.server``, ``client`` (async client with retries),
``regenerate`` (turn-by-turn answers and the run loop), ``writer`` / ``parquet`` (crash-safe shards and
manifest), ``config`` (the schema of ``conf/sample.yaml``), ``__main__`` (the Hydra entry point).
"""
