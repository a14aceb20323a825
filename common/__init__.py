"""What every stage shares, one module per thing: `files` (atomic writes, checksums), `target` (the target preset,
its config.json, the aux-layer ids), `distributed` (process group, the one (dp, sp) mesh, the device), `server`
(the OpenAI-compatible server launcher: vLLM or `transformers serve`), `entry` (the Hydra entry and the one preset
rule), `logs` (one log format). Nothing here imports a stage.
"""
