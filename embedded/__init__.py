"""The embedded default: SmolLM2-135M-Instruct and real prompt sets, all from PyPI wheels (no model hub)."""
