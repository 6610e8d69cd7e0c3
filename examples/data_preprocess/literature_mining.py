"""Literature-search tasks -> verl parquet (train.parquet, test.parquet, val.parquet).

    python examples/data_preprocess/literature_mining.py --task pubmed_mini --out data/rl/pubmed_mini
    python examples/data_preprocess/literature_mining.py --task pubmed --input publication_train.jsonl --out data/rl/pubmed

Tasks: pubmed, ctgov (LEADS PICO, live APIs), pubmed_mini, trials_sigir (vendored corpora, local
index). Same code as `deepretrieval prepare`.
"""

import argparse
import logging
import sys
from pathlib import Path

# runnable from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "code"))

from deepretrieval.data.cli import add_prepare_arguments, run_prepare  # noqa: E402


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = add_prepare_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return run_prepare(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
