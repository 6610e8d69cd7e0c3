#!/usr/bin/env bash
# The CPU recipe where RL has to beat the baselines: SmolLM2-135M-Instruct, a format warm-up on its own
# answers to a plain question about each training input (`--warmup self`), then 32 GRPO steps with a linear recall
# reward (and a soft penalty past 40 of the 64 answer tokens) on terms that are searched added to the input's words
# (prompt style `expand`), for 3 seeds; then every seed's
# policy next to `original` and the LLM / clinician baselines on the held-out test topics, with paired
# bootstrap intervals (deepretrieval.quickstart.recipe: results.md, comparison.json, curves.png).
#
#   bash code/scripts/recipe_cpu.sh                       # trials_sigir, seeds 1 2 3
#   bash code/scripts/recipe_cpu.sh pubmed_mini --seeds 1 # another task, one seed
#   bash code/scripts/recipe_cpu.sh --help                # the options (deepretrieval recipe --help)
#
# About 35-40 min per seed on 2 cores for trials_sigir (docs/recipe.md; pubmed_mini not yet measured with this
# recipe); rerunning the same command resumes.
set -euo pipefail
source "$(dirname "$0")/ensure_installed.sh"  # ROOT_DIR, PY; installs if needed
TASK=trials_sigir
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then TASK=$1; shift; fi  # a first argument that is not an option
cd "$ROOT_DIR"
exec "$PY" -m deepretrieval recipe --task "$TASK" --out "outputs/recipe_$TASK" --images-dir images "$@"
