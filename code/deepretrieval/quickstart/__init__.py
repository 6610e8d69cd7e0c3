"""The whole pipeline on the embedded pubmed_mini task, on a laptop CPU: `deepretrieval quickstart`.

    pipeline.py  the stages (data, model, warm-up, evaluation, GRPO training) and `run_quickstart`
    report.py    metrics curves, the before/after results table, the reward-curve figure
    cli.py       the `deepretrieval quickstart` command

The quickstart's prompt is the `compact` prompt style of deepretrieval.data.prompts.
"""

TASK = "pubmed_mini"  # the task every stage runs on, unless told otherwise (`--task`)
TASKS = ("pubmed_mini", "trials_sigir")  # the tasks with a vendored corpus (the local engine)
K = 100  # the cut-off of the recall the quickstart reports (recall@K on the local index)
