"""``python -m utils.profiles``: run a normalisation chain on a precomputed well table (argparse -> config -> call)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from utils.cli import SPELLING_NOTE, FlagParser, column_pair
from utils.profiles.chain import CHAINS, STEPS
from utils.profiles.controls import CONTROL_CHOICES
from utils.profiles.correct import CorrectConfig, correct_profiles
from utils.profiles.normalize import NORM_METHODS, SCOPES, VARIANCE_THRESHOLD

DESCRIPTION = (
    "Normalise and batch-correct a precomputed well_features.csv (raw or already normalised; emb* or CellProfiler "
    "columns; the paper's released embeddings included) and write OUTDIR/well_features.csv and OUTDIR/run.json. "
    "Chains and steps: docs/PROFILES.md."
)


def build_parser() -> argparse.ArgumentParser:
    """The flags; defaults come from ``CorrectConfig``."""
    p = FlagParser(prog="python -m utils.profiles", description=DESCRIPTION, epilog=SPELLING_NOTE)
    p.add_argument("-i", "--input", required=True, metavar="WELLS",
                   help="well table: .csv, .csv.gz, .tsv or .parquet")
    p.add_argument("-o", "--outdir", required=True, metavar="DIR", help="writes well_features.csv, then run.json")
    p.add_argument("--norm_method", required=True, metavar="CHAIN",
                   help=f"a paper method ({', '.join(NORM_METHODS)}), steps joined by _ ({', '.join(STEPS)}; "
                        f"name@controls fits a step on the controls), a named chain ({', '.join(CHAINS)}, "
                        f"jump_harmony), or a .json/.toml chain file")
    p.add_argument("--batch-key", default="batch", help="column Harmony corrects for: batch, plate, a source column")
    p.add_argument("--controls", default="auto", choices=CONTROL_CHOICES,
                   help="negative controls: auto (negcon when annotated, else DMSO), DMSO or negcon")
    p.add_argument("--control-query", default=None, help="pandas query selecting control wells (overrides --controls)")
    p.add_argument("--map", dest="column_map", type=column_pair, action="append", default=[], metavar="SRC=DST",
                   help="copy column SRC onto DST, e.g. --map Metadata_Compound=perturbation_id (repeatable); "
                        "JUMP Metadata_* names are recognised without it")
    p.add_argument("--norm-scope", choices=SCOPES, default="paper",
                   help="paper: standardize/mad_robustize per plate, spherize over all plates; or one scope for all")
    p.add_argument("--mad-reference", choices=("all", "controls"), default="all",
                   help="mad_robustize statistics from all wells (the paper) or the controls, unless the chain says")
    p.add_argument("--l2norm", action="store_true", help="scale each well profile to unit L2 norm first")
    p.add_argument("--variance-threshold", type=float, default=VARIANCE_THRESHOLD,
                   help="before each step, drop features with variance at or below this in controls or others")
    p.add_argument("--seed", type=int, default=0, help="seed of Harmony's k-means")
    p.add_argument("--parquet", action="store_true", help="write well_features.parquet instead of CSV")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, correct, and print a one-line summary."""
    args = build_parser().parse_args(argv)
    run = correct_profiles(CorrectConfig(**vars(args)))
    print(f"profiles: {run['n_wells']} wells ({run['n_controls']} controls), {run['n_features']}/"
          f"{run['n_features_in']} features after {run['chain']} in {run['seconds']:.1f} s -> "
          f"{Path(run['output'])}")
    return 0
