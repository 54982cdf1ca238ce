"""Compare precomputed representations (DINO, MAE, SimCLR, CellProfiler, ...) side by side on retrieval metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.cli import FlagParser, column_pair, run_cli
from utils.evaluation import METADATA_PRESETS, NSP_MODES, EvalConfig, default_device, run_evaluation
from utils.evaluation.metrics import BATCH_CLASSIFIERS

SPELLING = (
    "Spelling: the paper's evaluate.py has -i/--input, -b/--basedir, --seed and --orf (marked [paper]); every other "
    "flag is new here. Multi-word flags are written with hyphens (--null-size) and also accept underscores "
    "(--null_size), the spelling of the paper's training and inference scripts (utils.cli.FlagParser)."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The paper's flags (-i, -b, --orf, --seed) plus the options the standard metrics need."""
    p = FlagParser(description=__doc__, epilog=SPELLING)
    add = p.add_argument

    add("-i", "--input", required=True, help="[paper] subfolder of --basedir with one folder per representation")
    add("-b", "--basedir", default="SSL_data/embeddings", help="[paper] base directory (default %(default)s)")
    add("--orf", action="store_true", help="[paper] ORF set: gene_group replaces target; negcon wells are controls")
    add("--seed", type=int, default=507, help="[paper] seed of every permutation null (default 507)")
    add("-o", "--out", default=None, help="output folder (default: the input folder, as in the paper)")
    add("--nsp-mode", choices=NSP_MODES, default="perturbation",
        help="what 'same perturbation' means for target accuracy; well_position reproduces the paper")
    add("--null-size", type=int, default=10000, help="permutations per mAP null (copairs' null_size)")
    add("--replicate-null-size", type=int, default=1000, help="random sets in the percent-replicating null")
    add("--threshold", type=float, default=0.05, help="significance level for corrected p-values")
    add("--controls", nargs="+", default=["DMSO"], help="perturbation_id values of negative controls")
    add("--map", dest="column_map", type=column_pair, action="append", default=[], metavar="SRC=DST",
        help="copy a metadata column onto a required name, e.g. Metadata_broad_sample=perturbation_id")
    add("--metadata-preset", choices=tuple(METADATA_PRESETS), default="none",
        help="map the usual Metadata_* names (Plate, Well, broad_sample, Batch, moa) when present")
    add("--replicate-diffby", nargs="*", default=[],
        help="columns in which replicate positives must differ (copairs pos_diffby), e.g. a dose column")
    add("--batch-classifier", choices=tuple(BATCH_CLASSIFIERS), default="ridge")
    add("--device", default=None, help="torch device for the similarity GEMMs (default: cuda if present)")
    add("--compare-to", dest="compare_to", nargs="+", default=[], metavar="NAME",
        help="baseline representation folders (e.g. Random CellProfiler): summary.md states every other "
             "representation's gain in target and replicate mAP over each, with the sign")
    add("--sampled-p-values", action="store_true",
        help="always sample the mAP null, as copairs does (default: exact p-values when a group has at most "
             "--null-size rank arrangements)")
    add("--allow-different-wells", action="store_true",
        help="score each representation on all of its own wells, with a warning, instead of on the (plate, well) "
             "keys every representation shares (the default, so their numbers are comparable)")
    add("--no-progress", action="store_true", help="hide progress bars")
    add("--no-figures", action="store_true", help="write the tables only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, build the one EvalConfig (which validates them), and run the evaluation."""
    args = parse_args(argv)
    root = Path(args.basedir) / args.input
    cfg = EvalConfig(
        input_dir=root, out_dir=Path(args.out) if args.out else root, orf=args.orf, seed=args.seed,
        nsp_mode=args.nsp_mode, null_size=args.null_size, replicate_null_size=args.replicate_null_size,
        threshold=args.threshold, controls=tuple(args.controls), column_map=tuple(args.column_map),
        metadata_preset=args.metadata_preset, replicate_diffby=tuple(args.replicate_diffby),
        batch_classifier=args.batch_classifier, device=args.device or default_device(),
        progress=not args.no_progress, figures=not args.no_figures, compare_to=tuple(args.compare_to),
        sampled_p_values=args.sampled_p_values, allow_different_wells=args.allow_different_wells,
    )
    run_evaluation(cfg)
    return 0


if __name__ == "__main__":
    run_cli(main)
