#!/bin/sh
# The original DeepRetrieval publication-search run (Jiang et al. 2025), reproduced: the recipe of the
# original code/scripts/literature_search_train.sh with its verl config defaults, its prompt, its reward
# and its validation slice. It differs from the original only where the original was buggy (unencoded
# query URLs, a retry that still raised, one retrieved id dropped by `[:-1]`, search failures scored -3,
# ...); each difference is listed, with the reason, in docs/original.md.
#
#   python examples/data_preprocess/literature_mining.py --task pubmed --reproduce original \
#       --input <LEADS publication train.jsonl> --out data/rl/pubmed_original
#   sh code/scripts/literature_search_train_original.sh [key=value ...]
#
# Parquet files written by the original preprocessing (data/literature_mining/base/*.parquet,
# data_source "literature") work as they are: DATA_DIR=... TRAIN_FILE=train.parquet VAL_FILE=test.parquet.
#
# Recall cut-off, two stages as the original's reward comment says: train from scratch with recall over
# all results (up to PubMed's 9,999: RECALL_K=9999, 15 epochs), then 1-2 more epochs with the first 3,000
# (the same command with RECALL_K=3000 TOTAL_EPOCHS=17: it resumes from the last checkpoint of the same
# experiment folder).
#
# What is set here beyond the original script's own overrides (its config defaults, spelled out):
#   entropy_coeff 0.001, no dual clip (clip_ratio_c=null), the original prompt (in the data),
#   strict JSON answers (reward.strict_json), PubMed without a sort parameter (NCBI's default order) and
#   with the original date floor 1970/01/01, rollout/reference log-prob micro-batch 2.
# Every value can be overridden as an argument (arguments come last and win). All keys: docs/configuration.md.
set -eu

N_GPUS=${N_GPUS:-2}
BASE_MODEL=${BASE_MODEL:-Qwen/Qwen2.5-3B-Instruct}
DATA_DIR=${DATA_DIR:-data/rl/pubmed_original}
TRAIN_FILE=${TRAIN_FILE:-train.parquet}
VAL_FILE=${VAL_FILE:-val.parquet}
ROLLOUT_TP_SIZE=${ROLLOUT_TP_SIZE:-2}
RECALL_K=${RECALL_K:-9999}
TOTAL_EPOCHS=${TOTAL_EPOCHS:-15}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-literature_search_3b_original}
PYTHON=${PYTHON:-python3}

# the package comes from the Python environment: bash install.sh installs it (editable)

exec "$PYTHON" -m deepretrieval.trainer.main_ppo \
    data.train_files="$DATA_DIR/$TRAIN_FILE" \
    data.val_files="$DATA_DIR/$VAL_FILE" \
    data.train_batch_size=64 \
    data.val_batch_size=64 \
    data.max_prompt_length=500 \
    data.max_response_length=500 \
    actor_rollout_ref.model.path="$BASE_MODEL" \
    actor_rollout_ref.model.enable_gradient_checkpointing=true \
    actor_rollout_ref.actor.strategy=fsdp \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.ppo_micro_batch_size=8 \
    actor_rollout_ref.actor.ppo_epochs=1 \
    actor_rollout_ref.actor.clip_ratio=0.2 \
    actor_rollout_ref.actor.clip_ratio_c=null \
    actor_rollout_ref.actor.entropy_coeff=0.001 \
    actor_rollout_ref.actor.use_kl_loss=false \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.grad_clip=1.0 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=1 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.top_k=-1 \
    actor_rollout_ref.rollout.top_p=1.0 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size=2 \
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP_SIZE" \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.2 \
    actor_rollout_ref.ref.log_prob_micro_batch_size=2 \
    actor_rollout_ref.ref.fsdp_config.param_offload=true \
    critic.model.path="$BASE_MODEL" \
    critic.model.enable_gradient_checkpointing=true \
    critic.optim.lr=1e-5 \
    critic.ppo_micro_batch_size=8 \
    critic.cliprange_value=0.5 \
    algorithm.adv_estimator=gae \
    algorithm.gamma=1.0 \
    algorithm.lam=1.0 \
    algorithm.use_kl_in_reward=true \
    algorithm.kl_penalty=kl \
    algorithm.kl_ctrl.type=fixed \
    algorithm.kl_ctrl.kl_coef=0.001 \
    reward.strict_json=true \
    reward.pubmed.k="$RECALL_K" \
    reward.pubmed.sort=none \
    reward.pubmed.open_min_date=1970/01/01 \
    trainer.device=cuda \
    'trainer.logger=[console,wandb]' \
    trainer.val_before_train=false \
    trainer.n_gpus_per_node="$N_GPUS" \
    trainer.nnodes=1 \
    trainer.save_freq=50 \
    trainer.test_freq=200 \
    trainer.project_name=literature_search \
    trainer.experiment_name="$EXPERIMENT_NAME" \
    trainer.total_epochs="$TOTAL_EPOCHS" \
    "$@"
