"""Compare precomputed representations (DINO, MAE, SimCLR, CellProfiler, ...) side by side on retrieval metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.cli import run_cli
from utils.errors import ConfigError


def _mapping(value: str) -> tuple[str, str]:
    """Parse SRC=DST for --map."""
    src, sep, dst = value.partition("=")
    if not sep or not src or not dst:
        raise argparse.ArgumentTypeError(f"invalid --map {value!r}: use SOURCE=DEST, e.g. Metadata_Well=well")
    return src, dst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The paper's flags (-i, -b, --orf, --seed) plus the options the standard metrics need."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-i", "--input", required=True, help="subfolder of --basedir with one folder per representation")
    p.add_argument("-b", "--basedir", default="SSL_data/embeddings", help="base directory (default %(default)s)")
    p.add_argument("--orf", action="store_true", help="ORF set: gene_group replaces target; negcon wells are controls")
    p.add_argument("--seed", type=int, default=507, help="seed of every permutation null (default 507)")
    p.add_argument("-o", "--out", default=None, help="output folder (default: the input folder, as in the paper)")
    p.add_argument("--nsp-mode", choices=("perturbation", "well_position"), default="perturbation",
                   help="what 'same perturbation' means for target accuracy; well_position reproduces the paper")
    p.add_argument("--null-size", type=int, default=10000, help="permutations per mAP null (copairs' null_size)")
    p.add_argument("--replicate-null-size", type=int, default=1000, help="random sets in the percent-replicating null")
    p.add_argument("--threshold", type=float, default=0.05, help="significance level for corrected p-values")
    p.add_argument("--controls", nargs="+", default=["DMSO"], help="perturbation_id values of negative controls")
    p.add_argument("--map", dest="column_map", type=_mapping, action="append", default=[], metavar="SRC=DST",
                   help="copy a metadata column onto a required name, e.g. Metadata_broad_sample=perturbation_id")
    p.add_argument("--metadata-preset", choices=("none", "pycytominer"), default="none",
                   help="map the usual Metadata_* names (Plate, Well, broad_sample, Batch, moa) when present")
    p.add_argument("--replicate-diffby", nargs="*", default=[],
                   help="columns in which replicate positives must differ (copairs pos_diffby), e.g. a dose column")
    p.add_argument("--batch-classifier", choices=("ridge", "logistic", "random_forest"), default="ridge")
    p.add_argument("--device", default=None, help="torch device for the similarity GEMMs (default: cuda if present)")
    p.add_argument("--compare-to", dest="compare_to", nargs="+", default=[], metavar="NAME",
                   help="baseline representation folders (e.g. Random CellProfiler): summary.md states every other "
                        "representation's gain in target and replicate mAP over each, with the sign")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the config and run the evaluation."""
    from utils.evaluation import EvalConfig, default_device, run_evaluation

    args = parse_args(argv)
    root = Path(args.basedir) / args.input
    mapping = dict(args.column_map)
    if len(mapping) != len(args.column_map):
        raise ConfigError("--map names the same source column twice")
    cfg = EvalConfig(
        input_dir=root, out_dir=Path(args.out) if args.out else root, orf=args.orf, seed=args.seed,
        nsp_mode=args.nsp_mode, null_size=args.null_size, replicate_null_size=args.replicate_null_size,
        threshold=args.threshold, controls=tuple(args.controls), column_map=mapping,
        metadata_preset=args.metadata_preset, replicate_diffby=tuple(args.replicate_diffby),
        batch_classifier=args.batch_classifier, device=args.device or default_device(),
        progress=not args.no_progress, figures=not args.no_figures, compare_to=tuple(args.compare_to),
    )
    run_evaluation(cfg)
    return 0


if __name__ == "__main__":
    run_cli(main)
