"""``python -m supervised_baseline {train,eval,compare}`` and the paper's two scripts (``hti-cnn-master/``).

train / eval take the paper's flags: ``--config FILE``, ``--g``/``-g``/``--gpu`` GPU ids (ignored without CUDA),
``--j``/``-j``/``--workers`` loader workers, and any ``--section.key VALUE`` override (JSON-parsed when it parses).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from supervised_baseline.compare import compare, compare_config
from supervised_baseline.config import SupervisedConfig, load_config, parse_value, split_overrides
from supervised_baseline.scoring import evaluate
from supervised_baseline.train import train
from utils.cli import SPELLING_NOTE, FlagParser
from utils.errors import ConfigError


def _gpu_ids(text: str) -> tuple[int, ...]:
    """``1`` or ``0,1`` or ``-1`` (the paper's 'CPU'): GPU ids as a tuple; -1 means none."""
    try:
        ids = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid GPU list {text!r}: use e.g. 0 or 0,1 (-1 for the CPU)") from None
    return tuple(i for i in ids if i >= 0)


def _run_parser(prog: str) -> FlagParser:
    """The paper's PyLL flags for train and eval."""
    p = FlagParser(prog=prog, description=__doc__.splitlines()[0], epilog=SPELLING_NOTE + " Any other "
                   "--section.key VALUE overrides that config entry (e.g. --training.batchsize 128).")
    p.add_argument("-c", "--config", required=True, help="JSON config (schema: supervised_baseline/README.md)")
    p.add_argument("-g", "--g", "--gpu", dest="gpus", type=_gpu_ids, default=None,
                   help="GPU id(s), e.g. 1 or 0,1; ignored without CUDA (the run then uses the CPU and says so)")
    p.add_argument("-j", "--j", "--workers", dest="workers", type=int, default=None, help="data loader workers")
    return p


def _config(prog: str, argv: Sequence[str]) -> SupervisedConfig:
    """The paper's flags and overrides on top of the JSON config."""
    args, extra = _run_parser(prog).parse_known_args(argv)
    overrides = split_overrides(extra)
    if args.gpus is not None:
        overrides["training.gpus"] = list(args.gpus)
    if args.workers is not None:
        if args.workers < 0:
            raise ConfigError(f"--j {args.workers}: must be >= 0")
        overrides["training.workers"] = args.workers
    return load_config(args.config, overrides)


def _compare_parser() -> FlagParser:
    p = FlagParser(prog="python -m supervised_baseline compare", epilog=SPELLING_NOTE,
                   description="Train and score the FNN on every representation folder (well_features.csv) and split.")
    p.add_argument("-i", "--input", required=True, help="subfolder of --basedir with one folder per representation")
    p.add_argument("-b", "--basedir", default="SSL_data/embeddings", help="base directory (as evaluate.py)")
    p.add_argument("--labels", required=True, help="labels CSV (or a site table with label_* columns)")
    p.add_argument("--splits", default=None, help="splits.csv (default: compound splits drawn with the seed)")
    p.add_argument("--n-splits", type=int, default=3, help="splits to run (the paper: 3)")
    p.add_argument("--config", default=None, help="JSON config whose model and training recipe is reused")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry, e.g. --set training.epochs=20")
    p.add_argument("-o", "--out", default=None, help="output folder (default: <basedir>/<input>_supervised)")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``train``, ``eval`` or ``compare``."""
    argv = list(argv or [])
    if not argv or argv[0] not in ("train", "eval", "compare"):
        raise ConfigError("usage: python -m supervised_baseline {train,eval,compare} ... (--help after the command)")
    command, rest = argv[0], argv[1:]
    if command == "train":
        train(_config("python -m supervised_baseline train", rest))
    elif command == "eval":
        evaluate(_config("python -m supervised_baseline eval", rest))
    else:
        a = _compare_parser().parse_args(rest)
        overrides = {}
        for item in a.set:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. training.epochs=20")
            overrides[key] = parse_value(value)
        compare(compare_config(Path(a.basedir) / a.input, a.labels, a.out, a.splits, a.n_splits, a.config,
                               overrides, not a.no_figures))
    return 0
