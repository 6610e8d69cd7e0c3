"""Evaluation: query generation for a test split, baselines, recall tables and plots.

    from deepretrieval.eval import load_samples, BaselineMethod, evaluate, summarize, write_report
    samples = load_samples("trials_sigir", split="test")
    records = evaluate(samples, BaselineMethod("original"), "outputs/eval")
    write_report(summarize(records), "outputs/eval")

The command line is `deepretrieval eval` (deepretrieval.eval.cli); docs/evaluation.md has the
measured baseline table.

Submodules are imported on first use of a name (PEP 562 `__getattr__`), so that importing
`deepretrieval.eval.cli` (every `deepretrieval` command builds its parser from it) does not pull
in torch through the runner.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List

_EXPORTS: Dict[str, List[str]] = {
    "baselines": ["BASELINES", "PROMPT_MODES", "TASK_BASELINES", "baseline_query"],
    "llm_client": ["ChatClient", "ChatResult"],
    "metrics": ["Interval", "aggregate_samples", "bootstrap_ci"],
    "methods": ["BaselineMethod", "Generation", "LLMMethod", "ModelMethod", "QueryMethod"],
    "report": ["markdown_table", "plot_summaries", "summarize", "write_report"],
    "runner": ["evaluate"],
    "samples": ["EvalSample", "load_samples", "sample_from_row"],
    "searcher": ["Searcher"],
    "topics": ["TopicsFileError", "read_topics_file"],
    # the per-query metrics are the search package's (shared with the reward)
    "deepretrieval.search.metrics": ["ndcg_at_k", "precision_at_k", "query_metrics", "recall_at_k"],
    "deepretrieval.trainer.checkpoint": ["resolve_model_dir"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    path = module if module.startswith("deepretrieval.") else f"{__name__}.{module}"
    value = getattr(importlib.import_module(path), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> List[str]:
    return sorted(list(globals()) + __all__)
