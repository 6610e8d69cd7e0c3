"""Evaluation: query generation for a test split, baselines, recall tables and plots.

    from deepretrieval.eval import load_samples, BaselineMethod, evaluate, summarize, write_report
    samples = load_samples("trials_sigir", split="test")
    records = evaluate(samples, BaselineMethod("original"), "outputs/eval")
    write_report(summarize(records), "outputs/eval")

The command line is `deepretrieval eval` (deepretrieval.eval.cli); docs/evaluation.md has the
measured baseline table.
"""

from deepretrieval.eval.baselines import BASELINES, PROMPT_MODES, TASK_BASELINES, baseline_query
from deepretrieval.eval.llm_client import ChatClient, ChatResult
from deepretrieval.eval.metrics import (
    Interval,
    aggregate_samples,
    bootstrap_ci,
    ndcg_at_k,
    precision_at_k,
    query_metrics,
    recall_at_k,
)
from deepretrieval.eval.report import markdown_table, plot_summaries, summarize, write_report
from deepretrieval.eval.runner import (
    BaselineMethod,
    EvalSample,
    Generation,
    LLMMethod,
    ModelMethod,
    QueryMethod,
    Searcher,
    evaluate,
    load_samples,
    resolve_model_dir,
    sample_from_row,
)

__all__ = [
    "BASELINES", "PROMPT_MODES", "TASK_BASELINES", "baseline_query", "ChatClient", "ChatResult", "Interval",
    "aggregate_samples", "bootstrap_ci", "ndcg_at_k", "precision_at_k", "query_metrics", "recall_at_k",
    "markdown_table", "plot_summaries", "summarize", "write_report", "BaselineMethod", "EvalSample",
    "Generation", "LLMMethod", "ModelMethod", "QueryMethod", "Searcher", "evaluate", "load_samples",
    "resolve_model_dir", "sample_from_row",
]
