"""DeepRetrieval: reinforcement learning for LLM query writers, rewarded by search-engine recall."""

__version__ = "0.1.0"
