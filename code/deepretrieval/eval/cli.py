"""`deepretrieval eval`: recall tables for trained models, reference-query baselines and prompted LLMs.

One command, methods chosen by flags (any mix, each becomes a row of the table):

    # reference baselines on every vendored topic
    deepretrieval eval --task pubmed_mini --task trials_sigir --split all --baseline all --out outputs/eval/baselines
    # a trained model (HF folder or trainer checkpoint) on a prepared test split
    deepretrieval prepare --task trials_sigir --out data_out/trials_sigir   # the training/test parquet
    deepretrieval eval --data data_out/trials_sigir/test.parquet --model checkpoints/run/global_step_200 --out outputs/eval/run
    # your own topics (vendored format) against the vendored pubmed_mini corpus
    deepretrieval eval --topics my_topics.jsonl --corpus pubmed_mini --baseline all --model checkpoints/run --out outputs/eval/mine
    # an LLM behind an OpenAI-compatible endpoint, all four prompting modes
    OPENAI_API_KEY=... deepretrieval eval --task trials_sigir --llm gpt-4o --llm-mode all --out outputs/eval/gpt4o
    # re-make the table from every record file under an output folder
    deepretrieval eval --report-only --out outputs/eval/run

Outputs under --out: samples/<task>/<method>.jsonl (one record per query: reasoning, query, top-K
ids, metrics, error class), summary.json, table.md (mean [95% bootstrap interval] per method and
task) and recall.png. Re-running the same command resumes: finished queries are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List

logger = logging.getLogger(__name__)


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from deepretrieval.data.cli import FOLD_HELP

    data = p.add_argument_group("what to evaluate on")
    data.add_argument("--task", action="append", default=[], help="task (pubmed_mini, trials_sigir, pubmed, ctgov); "
                      "repeatable; its split is built from the vendored data")
    data.add_argument("--split", default="test", choices=["train", "test", "val", "all"],
                      help="split of --task (all = train+test: every topic; default test)")
    data.add_argument("--data", action="append", default=[], help="test parquet file(s) instead of --task")
    data.add_argument("--topics", action="append", default=[], metavar="FILE",
                      help="your own topics (JSON Lines in the vendored topics' format, docs/evaluation.md) "
                      "against a vendored corpus; repeatable; each file is a column of the table")
    data.add_argument("--corpus", "--index", dest="corpus", default=None, choices=["pubmed_mini", "trials_sigir"],
                      help="the vendored corpus (and its local index) that --topics are searched in "
                      "(default: from the records: `title` -> pubmed_mini, `patient` -> trials_sigir)")
    data.add_argument("--limit", type=int, default=None, help="first N topics per task only")
    data.add_argument("--seed", type=int, default=42, help="seed of the task split (as in `prepare`), of "
                      "sampled generation and of the few-shot example choice")
    data.add_argument("--fold", type=int, default=0, help=FOLD_HELP)

    methods = p.add_argument_group("methods (any mix)")
    methods.add_argument("--baseline", action="append", default=[],
                         help="original | expert_boolean | clinicians | gpt4_conditions | gpt35_conditions | "
                         "human_summary | all (every baseline that applies to the task); repeatable")
    methods.add_argument("--model", action="append", default=[], help="HF model folder or trainer checkpoint; repeatable")
    methods.add_argument("--model-name", action="append", default=[], help="table name for each --model (in order)")
    methods.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                         help="generation backend for --model (auto: vllm if importable with a GPU, else hf)")
    methods.add_argument("--n", type=int, default=1, help="queries per topic (1 = greedy; >1 samples, adds best-of-n)")
    methods.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when --n > 1")
    methods.add_argument("--top-p", type=float, default=1.0)
    methods.add_argument("--max-new-tokens", type=int, default=512)
    methods.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                         help="--model answers never repeat an N-gram of their own tokens (hf backend; 0 = off; "
                              "2 stops a greedy `a OR a OR a` loop)")
    methods.add_argument("--max-prompt-length", type=int, default=1024)
    methods.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    methods.add_argument("--device", default=None, help="torch device for --model (default cuda if available)")
    methods.add_argument("--prompt-style", default=None,
                         help="prompt style for --model (default: the one the model was trained with, from its "
                         "prompt.json; else the data's own). A style other than the trained one is refused")
    methods.add_argument("--force-prompt-style", action="store_true",
                         help="evaluate --model with --prompt-style even where it was trained with another")

    llm = p.add_argument_group("prompted LLMs (OpenAI-compatible chat completions)")
    llm.add_argument("--llm", action="append", default=[], help="model name at the endpoint; repeatable")
    llm.add_argument("--llm-mode", action="append", default=[],
                     help="zero_shot | few_shot | icl | icl_few_shot | all (default zero_shot); repeatable")
    llm.add_argument("--llm-base-url", default=None, help="endpoint (default $OPENAI_BASE_URL or api.openai.com/v1)")
    llm.add_argument("--llm-api-key-env", default="OPENAI_API_KEY",
                     help="environment variable holding the key (the key itself is never a flag or logged)")
    llm.add_argument("--llm-azure-api-version", default=None, help="Azure OpenAI api-version (model = deployment)")
    llm.add_argument("--llm-concurrency", type=int, default=4)
    llm.add_argument("--llm-max-tokens", type=int, default=1024)
    llm.add_argument("--llm-retries", type=int, default=4)
    llm.add_argument("--llm-timeout", type=float, default=120.0)
    llm.add_argument("--shots", type=int, default=3, help="few-shot examples (other topics' reference queries)")

    search = p.add_argument_group("search and report")
    search.add_argument("--k", type=int, default=None, help="cut-off K (default per task: 100 local, 3000 live)")
    search.add_argument("--ks", default=None, help="comma-separated cut-offs instead of 10,100 (K is always added)")
    search.add_argument("--reward-config", default=None, help="JSON/YAML file with the trainer's `reward` "
                        "section (or a whole trainer config): engines and their options per data source")
    search.add_argument("--search-cache", default=None,
                        help="SQLite search cache (default <out>/search_cache.sqlite; 'none' to disable)")
    search.add_argument("--search-threads", type=int, default=None,
                        help="searches at once (default per engine: local 2-4, live 8, as the reward manager)")
    search.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    search.add_argument("--out", required=True, help="output folder")
    search.add_argument("--no-plot", action="store_true")
    search.add_argument("--report-only", action="store_true",
                        help="only rebuild summary/table/plot from the record files under --out")
    return p


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate trained models, reference baselines and prompted LLMs (recall tables)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)


def _load_config(path: str) -> Any:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        from omegaconf import OmegaConf

        try:
            return OmegaConf.to_container(OmegaConf.create(text), resolve=True)
        except Exception as exc:  # yaml/omegaconf errors are not ValueErrors
            raise ValueError(f"{path}: {type(exc).__name__}: {exc}") from None
    return json.loads(text)


def _records_under(out: Path) -> List[Dict[str, Any]]:
    records = []
    for path in sorted((out / "samples").glob("*/*.jsonl")):
        latest: Dict[str, Dict[str, Any]] = {}
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                latest[rec["key"]] = rec
        records.extend(latest.values())
    return records


def build_methods(args: argparse.Namespace, tasks: List[str], pool: List[Any]) -> List[Any]:
    from deepretrieval.eval import baselines
    from deepretrieval.eval.methods import BaselineMethod, LLMMethod, ModelMethod

    methods: List[Any] = []
    # baseline -> the tasks it runs on (None: every task); `all` picks, per task, the baselines that
    # apply there, so a table has no all-"not applicable" rows
    chosen: Dict[str, Any] = {}
    for b in args.baseline:
        if b == "all":
            for t in tasks:
                for name in baselines.TASK_BASELINES.get(t, ["original"]):
                    if chosen.get(name, ()) is not None:
                        chosen[name] = tuple(chosen.get(name, ())) + (t,)
        else:
            chosen[b] = None
    for name, only in chosen.items():
        method = BaselineMethod(name)
        method.tasks = only
        methods.append(method)
    for i, path in enumerate(args.model):
        name = args.model_name[i] if i < len(args.model_name) else None
        methods.append(ModelMethod(
            path, name=name, backend=args.backend, n=args.n, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
            batch_size=args.batch_size, device=args.device, seed=args.seed,
            prompt_style=args.prompt_style, force_prompt_style=args.force_prompt_style,
            no_repeat_ngram_size=args.no_repeat_ngram,
        ))
    if args.llm:
        from deepretrieval.eval.llm_client import ChatClient

        modes = args.llm_mode or ["zero_shot"]
        if "all" in modes:
            modes = list(baselines.PROMPT_MODES)
        for model in args.llm:
            client = ChatClient(
                base_url=args.llm_base_url, model=model, api_key_env=args.llm_api_key_env,
                azure_api_version=args.llm_azure_api_version, max_tokens=args.llm_max_tokens,
                timeout_s=args.llm_timeout, max_retries=args.llm_retries, concurrency=args.llm_concurrency,
                cache_path=Path(args.out) / "llm_cache.sqlite",
            )
            for mode in dict.fromkeys(modes):
                methods.append(LLMMethod(client, mode=mode, n=args.n,
                                         temperature=args.temperature if args.n > 1 else 0.0,
                                         shots=args.shots, pool=pool, seed=args.seed))
    return methods


def _topic_samples(args: argparse.Namespace, out: Path) -> List[Any]:
    """The samples of every --topics file, each file a suite of its own (topics.suite_label); each
    file's check goes to <out>/topics/<suite's folder name>.check.json."""
    from deepretrieval.eval.methods import slug
    from deepretrieval.eval.topics import load_topic_samples

    samples: List[Any] = []
    taken: Dict[str, str] = {}
    for path in args.topics:
        found, check = load_topic_samples(path, corpus=args.corpus, limit=args.limit, taken=taken)
        target = out / "topics" / f"{slug(check.suite)}.check.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(check.to_dict(), indent=2) + "\n")
        samples.extend(found)
    return samples


def run_eval(args: argparse.Namespace) -> int:
    from deepretrieval.eval.report import summarize, write_report
    from deepretrieval.eval.runner import evaluate
    from deepretrieval.eval.samples import load_samples
    from deepretrieval.eval.searcher import Searcher

    out = Path(args.out)
    if args.report_only:
        records = _records_under(out)
        if not records:
            logger.error("no record files under %s/samples", out)
            return 1
        summaries = summarize(records, n_resamples=args.bootstrap)
        paths = write_report(summaries, out, plot=not args.no_plot)
        print(paths["table"].read_text())
        return 0
    try:
        samples = []
        if args.data:
            for task in (args.task or [None]):
                samples.extend(load_samples(task=task, parquet=args.data, limit=args.limit))
        else:
            if not args.task and not args.topics:
                logger.error("give --task, --data or --topics")
                return 2
            for task in args.task:
                samples.extend(load_samples(task=task, split=args.split, limit=args.limit, seed=args.seed,
                                            fold=args.fold))
        samples.extend(_topic_samples(args, out))
    except (OSError, ValueError, KeyError) as exc:  # a TopicsFileError is a ValueError
        logger.error("cannot load the samples: %s", exc)
        return 1
    if not samples:
        logger.error("no samples to evaluate")
        return 1
    tasks = list(dict.fromkeys(s.task for s in samples))
    try:
        methods = build_methods(args, tasks, samples)
    except (OSError, ValueError, RuntimeError) as exc:
        logger.error("%s", exc)
        return 2
    if not methods:
        logger.error("nothing to evaluate: give --baseline, --model or --llm")
        return 2
    cache: Any = out / "search_cache.sqlite"
    if args.search_cache:
        cache = None if args.search_cache.lower() in ("none", "off", "false") else args.search_cache
    try:
        reward_config = _load_config(args.reward_config) if args.reward_config else None
        ks = [int(x) for x in args.ks.split(",")] if args.ks else None
    except (OSError, ValueError) as exc:  # missing/unreadable config, bad JSON/YAML, --ks not integers
        logger.error("bad --reward-config or --ks: %s", exc)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    searcher = Searcher(reward_config=reward_config, k=args.k, cache=cache, threads=args.search_threads)
    records: List[Dict[str, Any]] = []
    for method in methods:
        only = getattr(method, "tasks", None)
        todo = [s for s in samples if only is None or s.task in only]
        logger.info("evaluating %s on %d topics", method.name, len(todo))
        records.extend(evaluate(todo, method, out, searcher=searcher, ks=ks))
    summaries = summarize(records, n_resamples=args.bootstrap)
    paths = write_report(summaries, out, plot=not args.no_plot)
    print(paths["table"].read_text())
    for name, path in paths.items():
        logger.info("%s: %s", name, path)
    return 0
