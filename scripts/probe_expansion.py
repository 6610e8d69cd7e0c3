"""What adding terms to the input's words can do, before any training (docs/recipe.md, "What the starting
point is"): recall@K of `(input's words) OR (added terms)` (search.text.expanded_query, the `expand`
style's search) on every topic of a vendored task, for additions that need no training:

    input alone            the `original` baseline
    + random input words   `--draws` draws of 5 of the input's own words: mean and best-of-draws
    + the model's answers  `--draws` sampled answers of the untrained model to the `self` warm-up's
                           question (quickstart.self_warmup), each OR'ed: mean and best-of-draws
    + consensus words      the words that >= 2 of those answers contain and the answers of <= 25% of
                           the topics (self_warmup.consensus_terms: the `self` warm-up's targets)
    + GPT-4 conditions     trials_sigir only: the reference LLM condition lists

Best-of-draws picks per topic with the judgements, so it is an upper bound of what choosing among
such additions can give, not a policy.

    python scripts/probe_expansion.py --task trials_sigir
    python scripts/probe_expansion.py --task pubmed_mini
    python scripts/probe_expansion.py --task pubmed_mini --split train --question "Which drugs ...?"

`--split train` probes the training topics only (to choose a warm-up setting without the test topics);
`--question` asks the model another question than the `self` warm-up's (SELF_QUESTIONS).
"""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Dict, List


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="trials_sigir", choices=["trials_sigir", "pubmed_mini"])
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="all", choices=["all", "train", "test"], help="the task's topics probed")
    ap.add_argument("--show", action="store_true", help="print each topic's consensus words")
    ap.add_argument("--question", default=None, help="the question the model answers (default: the self warm-up's)")
    args = ap.parse_args()

    from tqdm import tqdm

    from deepretrieval.eval.baselines import baseline_query
    from deepretrieval.eval.samples import load_samples
    from deepretrieval.eval.searcher import Searcher
    from deepretrieval.models.pretrained import prepare_smollm2
    from deepretrieval.quickstart.self_warmup import consensus_terms, sample_answers
    from deepretrieval.search.metrics import recall_at_k
    from deepretrieval.search.text import bag_of_words, expanded_query, or_query

    samples = load_samples(task=args.task, split=args.split)
    searcher = Searcher(k=args.k)
    kind = samples[0].row["extra_info"]["task_kind"]
    model = str(prepare_smollm2())
    rng = random.Random(args.seed)

    def recall(sample, query) -> float:
        ids, err, _, _ = searcher.search(sample, query)
        return (recall_at_k(ids, sample.relevant, args.k) or 0.0) if err == "none" else 0.0

    def with_added(sample, words) -> float:
        """recall of the input's words OR `words` (the input alone when there are none)."""
        text = sample.need_text
        return recall(sample, expanded_query(text, " OR ".join(words)) if words else or_query(text))

    answers = sample_answers(model, [s.need_text for s in samples], kind, args.draws, args.seed, question=args.question)
    consensus = consensus_terms(answers)
    rows: Dict[str, List[float]] = {}
    for sample, own, agreed in tqdm(list(zip(samples, answers, consensus)), desc="topics", unit="topic"):
        text = sample.need_text
        rows.setdefault("input alone (original)", []).append(recall(sample, or_query(text)))
        words = bag_of_words(text)
        rand = [with_added(sample, rng.sample(words, min(5, len(words)))) for _ in range(args.draws)]
        rows.setdefault(f"+ 5 random input words, mean of {args.draws}", []).append(statistics.mean(rand))
        rows.setdefault(f"+ 5 random input words, best of {args.draws}", []).append(max(rand))
        mine = [with_added(sample, bag_of_words(a)) for a in own]
        rows.setdefault(f"+ the untrained model's answer, mean of {args.draws}", []).append(statistics.mean(mine))
        rows.setdefault(f"+ the untrained model's answer, best of {args.draws}", []).append(max(mine))
        rows.setdefault("+ consensus words of the answers", []).append(with_added(sample, agreed))
        if args.show:
            tqdm.write(f"{sample.topic_id}: {text[:60]!r} + {' '.join(agreed)!r}")
        if args.task == "trials_sigir":
            gpt4 = baseline_query("gpt4_conditions", sample)
            if gpt4:
                rows.setdefault("+ GPT-4 condition list", []).append(recall(sample, expanded_query(text, gpt4)))
    print(f"\n{args.task} ({args.split}), {len(samples)} topics, recall@{args.k} of (input's words) OR (addition); "
          f"question: {args.question or 'the self warm-up'}")
    print("| addition | recall | topics |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.mean(values):.3f} | {len(values)} |")


if __name__ == "__main__":
    main()
