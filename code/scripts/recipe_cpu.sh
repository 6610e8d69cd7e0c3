#!/usr/bin/env bash
# The CPU recipe where RL has to beat the baselines: SmolLM2-135M-Instruct, a format warm-up on random
# words of the training inputs, then GRPO with a linear recall reward, for 3 seeds; then every seed's
# policy next to `original` and the LLM / clinician baselines on the held-out test topics, with paired
# bootstrap intervals (deepretrieval.quickstart.recipe: results.md, comparison.json, curves.png).
#
#   bash code/scripts/recipe_cpu.sh                       # trials_sigir, seeds 1 2 3
#   bash code/scripts/recipe_cpu.sh pubmed_mini --seeds 1 # another task, one seed
#
# About 40 min per seed on 2 cores (docs/recipe.md); rerunning the same command resumes.
set -euo pipefail
ROOT_DIR=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
if ! "$PY" -c 'import deepretrieval' 2>/dev/null; then
  echo "deepretrieval is not installed: running install.sh" >&2
  PYTHON="$PY" bash "$ROOT_DIR/install.sh"
fi
TASK=${1:-trials_sigir}
[ $# -gt 0 ] && shift
export WANDB_MODE=${WANDB_MODE:-offline}
cd "$ROOT_DIR"
exec "$PY" -m deepretrieval recipe --task "$TASK" --out "outputs/recipe_$TASK" --images-dir images "$@"
