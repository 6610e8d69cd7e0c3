#!/bin/sh
# DeepRetrieval literature search (publications, live PubMed) with PPO — the project's recipe on the
# original hyper-parameters.
#
#   sh code/scripts/literature_search_train.sh [key=value ...]
#
# The hyper-parameters are the DeepRetrieval paper's run: Qwen2.5-3B-Instruct as actor and critic on 2
# GPUs, train batch 64 prompts, prompt and response 500 tokens, actor lr 1e-6, critic lr 1e-5,
# mini-batch 16, micro-batch 8 (across the 2 GPUs), entropy bonus 0.001, KL coefficient 0.001 applied
# in the reward, GAE with gamma = lambda = 1, vLLM rollout (tensor parallel 2, 20% of GPU memory),
# gradient checkpointing, reference parameters offloaded to CPU, checkpoint every 50 steps, validation
# every 200, 15 epochs, wandb project `literature_search`. It is NOT the exact original run: it keeps
# the project's prompt (chat template, PubMed syntax help), lenient answer parsing, recall@3000,
# PubMed sorted by relevance, dual clip 3 and a seeded 100-row validation sample.
# The exact reproduction is literature_search_train_original.sh (docs/original.md lists every
# difference).
# Every value can be overridden: environment variables below, or any config key as an argument
# (arguments come last and win), e.g. `trainer.n_gpus_per_node=4 data.train_batch_size=128`.
# All keys: docs/configuration.md.
#
# Data: python examples/data_preprocess/literature_mining.py --task pubmed --input <LEADS publication train> --out data/rl/pubmed
# The live PubMed engine reads NCBI_API_KEY from the environment when set (raises the rate limit).
# Note: rollout.name=vllm needs the vllm package (requirements-gpu.txt); without it the run stops at
# start with a message — `actor_rollout_ref.rollout.name=hf` runs the same recipe with HF generation.
# ROLLOUT_TP_SIZE must divide N_GPUS: each group of ROLLOUT_TP_SIZE consecutive GPUs runs one vLLM engine
# on the prompts of its ranks (TP 2 on 2 GPUs: one engine over both). The vLLM rollout, tensor
# parallelism included, is tested on CPU with a fake engine only, not yet on GPUs (docs/benchmarks.md).
set -eu

N_GPUS=${N_GPUS:-2}
BASE_MODEL=${BASE_MODEL:-Qwen/Qwen2.5-3B-Instruct}
DATA_DIR=${DATA_DIR:-data/rl/pubmed}
ROLLOUT_TP_SIZE=${ROLLOUT_TP_SIZE:-2}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-pubmed_search_qwen2.5_3b_instruct}
PYTHON=${PYTHON:-python3}

# the package comes from the Python environment: bash install.sh installs it (editable)

exec "$PYTHON" -m deepretrieval.trainer.main_ppo \
    data.train_files="$DATA_DIR/train.parquet" \
    data.val_files="$DATA_DIR/val.parquet" \
    data.train_batch_size=64 \
    data.max_prompt_length=500 \
    data.max_response_length=500 \
    actor_rollout_ref.model.path="$BASE_MODEL" \
    actor_rollout_ref.model.enable_gradient_checkpointing=true \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.ppo_micro_batch_size=8 \
    actor_rollout_ref.actor.entropy_coeff=0.001 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.log_prob_micro_batch_size=8 \
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP_SIZE" \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.2 \
    actor_rollout_ref.ref.log_prob_micro_batch_size=4 \
    actor_rollout_ref.ref.fsdp_config.param_offload=true \
    critic.model.path="$BASE_MODEL" \
    critic.model.enable_gradient_checkpointing=true \
    critic.optim.lr=1e-5 \
    critic.ppo_micro_batch_size=8 \
    algorithm.adv_estimator=gae \
    algorithm.gamma=1.0 \
    algorithm.lam=1.0 \
    algorithm.use_kl_in_reward=true \
    algorithm.kl_ctrl.kl_coef=0.001 \
    trainer.device=cuda \
    'trainer.logger=[console,wandb]' \
    trainer.val_before_train=false \
    trainer.n_gpus_per_node="$N_GPUS" \
    trainer.nnodes=1 \
    trainer.save_freq=50 \
    trainer.test_freq=200 \
    trainer.project_name=literature_search \
    trainer.experiment_name="$EXPERIMENT_NAME" \
    trainer.total_epochs=15 \
    "$@"
