# Sourced by the one-command scripts (quickstart.sh, recipe_cpu.sh): sets ROOT_DIR (the repository) and
# PY (the Python to use: $PYTHON or python3), installs the project with install.sh when `deepretrieval`
# is not importable, and exports WANDB_MODE=offline unless set.
ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
if ! "$PY" -c 'import deepretrieval' 2>/dev/null; then
  echo "deepretrieval is not installed: running install.sh" >&2
  PYTHON="$PY" bash "$ROOT_DIR/install.sh"
fi
export WANDB_MODE=${WANDB_MODE:-offline}
