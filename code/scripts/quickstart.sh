#!/usr/bin/env bash
# DeepRetrieval in one command, on a laptop CPU (no GPU, no API key, nothing downloaded at run time):
#
#   bash code/scripts/quickstart.sh                 # SmolLM2-135M-Instruct, ~15 min on 2 cores
#   bash code/scripts/quickstart.sh --tiny --steps 3   # tiny random model, ~2 min (what CI runs)
#   bash code/scripts/quickstart.sh --out DIR --steps 24 actor_rollout_ref.actor.optim.lr=1e-6
#
# Installs the project (bash install.sh) when `deepretrieval` is not importable, then runs
# `python -m deepretrieval quickstart "$@"`. Rerunning resumes an interrupted run (--fresh restarts).
set -euo pipefail
source "$(dirname "$0")/ensure_installed.sh"  # ROOT_DIR, PY; installs if needed
cd "$ROOT_DIR"
exec "$PY" -m deepretrieval quickstart "$@"
