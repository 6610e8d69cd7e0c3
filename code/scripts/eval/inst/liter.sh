#!/usr/bin/env bash
# Evaluate a literature-search query writer on a task's test split, next to the reference baselines.
#
#   bash code/scripts/eval/inst/liter.sh MODEL [TASK] [OUT]
#
# MODEL  a Hugging Face model folder or a trainer checkpoint (global_step_N, or the checkpoint root:
#        its latest step's actor/huggingface folder is used)
# TASK   pubmed_mini (default) | trials_sigir | pubmed | ctgov  (pubmed/ctgov search the live APIs, K=3000)
# OUT    output folder (default outputs/eval/<TASK>/<model folder name>)
#
# The model is prompted as it was trained: the trainer's checkpoint (and its HF export) holds
# prompt.json with the prompt style, and the task's rows are rendered in that style.
#
# Environment knobs: DATA=path/to/test.parquet (instead of the task's own split), N=queries per topic (default 1 = greedy),
# TEMPERATURE (when N>1), BACKEND=auto|hf|vllm, BATCH_SIZE, MAX_NEW_TOKENS, K (cut-off),
# BASELINES="all" (or "" to skip them), EXTRA="more deepretrieval eval flags".
# Re-running the same command resumes an interrupted evaluation.
set -euo pipefail

MODEL=${1:?usage: liter.sh MODEL [TASK] [OUT]}
TASK=${2:-pubmed_mini}
OUT=${3:-outputs/eval/${TASK}/$(basename "${MODEL%/}")}

args=(eval --model "$MODEL" --out "$OUT"
      --n "${N:-1}" --temperature "${TEMPERATURE:-1.0}" --backend "${BACKEND:-auto}"
      --batch-size "${BATCH_SIZE:-8}" --max-new-tokens "${MAX_NEW_TOKENS:-512}")
if [[ -n "${DATA:-}" ]]; then
  args+=(--data "$DATA" --task "$TASK")
else
  args+=(--task "$TASK" --split test)
fi
for b in ${BASELINES-all}; do args+=(--baseline "$b"); done
[[ -n "${K:-}" ]] && args+=(--k "$K")
# shellcheck disable=SC2206
[[ -n "${EXTRA:-}" ]] && args+=(${EXTRA})

# paths stay relative to where the script is called from
# the package comes from the Python environment: bash install.sh installs it (editable)
python -m deepretrieval "${args[@]}"
