"""``python -m utils.handcrafted``: flags -> ``HandcraftedConfig`` -> ``run``, and a one-line summary.

The parser only parses: defaults come from the config's fields and every check lives in
``HandcraftedConfig.__post_init__``, so the command line and Python callers accept exactly the same settings.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.cli import SPELLING_NOTE, FlagParser, add_metadata_flags, bool_flag
from utils.handcrafted.config import HandcraftedConfig, defaults
from utils.handcrafted.measure import FEATURE_GROUPS
from utils.handcrafted.pipeline import run
from utils.handcrafted.profiles import NORM_METHODS, OPERATIONS, SELECT_OPERATIONS
from utils.profiles.controls import CONTROL_CHOICES
from utils.profiles.normalize import NO_NORMALISATION

DESCRIPTION = (
    "CellProfiler-style handcrafted well profiles (segmentation + cp_measure + pycytominer). Every flag with an "
    "underscore takes either spelling, --norm_method or --norm-method (underscore or hyphen): the paper's code had "
    "no handcrafted CLI."
)


def _add(p: argparse.ArgumentParser, name: str, *short: str, **kwargs: Any) -> None:
    """Add ``--name`` with the config field's default (``FlagParser`` also takes ``--na-me``)."""
    flags = [*short, f"--{name}"]
    if not kwargs.get("required"):
        kwargs["default"] = defaults()[name]
        kwargs["help"] += " (default: %(default)s)"
    p.add_argument(*flags, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The handcrafted CLI; one flag per ``HandcraftedConfig`` field, in field order."""
    p = FlagParser(prog="python -m utils.handcrafted", description=DESCRIPTION, epilog=SPELLING_NOTE)
    _add(p, "valset", required=True, metavar="CSV", help="dataset CSV (paper or JUMP load_data columns)")
    _add(p, "output_dir", "-o", required=True, metavar="DIR",
         help="writes well_features.csv, site_features.csv, run.json")
    _add(p, "image_root", metavar="DIR", help="folder relative image paths are resolved against")
    add_metadata_flags(p)
    _add(p, "channels", metavar="LIST", help="channel names in file order")
    _add(p, "workers", type=int, metavar="N", help="parallel site processes (>= 1)")
    _add(p, "features", metavar="LIST", help=f"comma list of {', '.join(FEATURE_GROUPS)}")
    _add(p, "texture_channels", metavar="LIST", help="comma list of the channels measured by texture")
    _add(p, "texture_scale", type=int, metavar="N", help="texture offset in pixels (>= 1)")
    _add(p, "texture_gray_levels", type=int, metavar="N", help="grey levels of the texture co-occurrence matrix (>= 2)")
    _add(p, "intensity_edges", type=bool_flag, metavar="BOOL", help="also measure object-edge intensities")
    _add(p, "nucleus_diameter", type=float, metavar="PX", help="typical nucleus diameter in pixels (> 0)")
    _add(p, "min_nucleus_area", type=int, metavar="PX", help="smaller nuclei are dropped as specks (pixels)")
    _add(p, "max_cell_distance", type=float, metavar="PX",
         help="cells reach at most this far from their nucleus (pixels, > 0)")
    _add(p, "discard_border", type=bool_flag, metavar="BOOL", help="drop nuclei touching the image edge")
    _add(p, "cyto_channels", metavar="LIST", help="comma list of the channels summed into the cytoplasm image")
    _add(p, "site_operation", metavar="OP", help=f"objects -> site: {', '.join(OPERATIONS)}")
    _add(p, "well_operation", metavar="OP", help=f"sites -> well: {', '.join(OPERATIONS)}")
    _add(p, "max_sites_per_well", type=int, metavar="K", help="use only the first K sites of each well (>= 1)")
    _add(p, "norm_method", metavar="CHAIN",
         help=f"{', '.join(NORM_METHODS)} (none is an alias of {NO_NORMALISATION}), or any normalisation chain of "
              "docs/PROFILES.md (e.g. mad_robustize_spherize_harmony, jump_harmony, a .json/.toml chain file)")
    _add(p, "controls", metavar="RULE", help=f"{', '.join(CONTROL_CHOICES)}: auto is negcon if annotated, else DMSO")
    _add(p, "control_query", metavar="QUERY", help="pandas query selecting control wells (overrides --controls)")
    _add(p, "batch_key", metavar="COL", help="metadata column a harmony step corrects for (batch, plate, ...)")
    _add(p, "feature_select", metavar="LIST", help=f"comma list of {', '.join(SELECT_OPERATIONS)}, or none")
    _add(p, "corr_threshold", type=float, metavar="R",
         help="correlation_threshold drops one of each pair correlated above this")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), run the pipeline and print a one-line summary."""
    cfg = HandcraftedConfig(**vars(build_parser().parse_args(argv)))
    s = run(cfg)
    dropped = f", {len(s['dropped_empty_wells'])} wells without cells dropped" if s["dropped_empty_wells"] else ""
    print(f"handcrafted: {s['n_sites']} sites, {s['n_objects']} cells, {s['n_wells']} wells{dropped}, "
          f"{s['n_features']}/{s['n_features_measured']} features kept ({s['normalisation']['method']}) "
          f"in {s['seconds']:.1f} s -> {Path(cfg.output_dir) / 'well_features.csv'}")
    return 0
