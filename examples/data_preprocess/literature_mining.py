"""Literature-search tasks -> verl parquet (train.parquet, test.parquet, val.parquet).

    python examples/data_preprocess/literature_mining.py --task pubmed_mini --out data/rl/pubmed_mini
    python examples/data_preprocess/literature_mining.py --task pubmed --input publication_train.jsonl --out data/rl/pubmed
    python examples/data_preprocess/literature_mining.py --task pubmed --reproduce original --input train.jsonl --out data/rl/pubmed_original

Tasks: pubmed, ctgov (LEADS PICO, live APIs), pubmed_mini, trials_sigir (vendored corpora, local
index). Same code as `deepretrieval prepare`. `--input` / `--test-input` take LEADS raw rows in the
project's spelling `{"id", "pico", "targets", "pub_date"}` or the original DeepRetrieval's
`{"pico", "publication_pmids", "pub_date"}`.

`--reproduce original` writes what the original DeepRetrieval preprocessing fed its run: the
original prompt text and frame (`--style original`) and, as val.parquet, the first 101 rows of the
test file in its original order (`--val-from first --val-size 101`). docs/original.md.
"""

import argparse
import logging
import sys

from deepretrieval.data.cli import add_prepare_arguments, run_prepare

# --reproduce original: the settings of the original DeepRetrieval preprocessing
ORIGINAL_SETTINGS = {"style": "original", "val_from": "first", "val_size": 101}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = add_prepare_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--reproduce",
        choices=("original",),
        default=None,
        help="original: the original DeepRetrieval prompt and validation slice (overrides --style, --val-from, --val-size)",
    )
    args = parser.parse_args(argv)
    if args.reproduce == "original":
        for key, value in ORIGINAL_SETTINGS.items():
            setattr(args, key, value)
    return run_prepare(args)


if __name__ == "__main__":
    sys.exit(main())
