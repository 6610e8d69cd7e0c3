"""What a worker writes into its folder of a checkpoint (`global_step_N/actor/`, `.../critic/`;
the whole layout: deepretrieval.trainer.checkpoint)."""

SHARDS_DIR = "model_optim"  # model and optimiser shards (torch.distributed.checkpoint)
EXTRA_STATE = "extra_state_rank{rank}.pt"  # scheduler and RNG state of one rank
HF_DIR = "huggingface"  # the actor exported as a Hugging Face folder
LORA_ADAPTER_DIR = "lora_adapter"  # with LoRA: the adapter in peft's format
