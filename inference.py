"""Embed Cell Painting sites with a DINO, MAE or SimCLR backbone into normalised well profiles (the paper's flags)."""

from __future__ import annotations

import argparse

from utils.cli import SPELLING_NOTE, FlagParser, add_metadata_flags, run_cli
from utils.inference.config import (
    CROP_MODES,
    DEVICES,
    EDGE_RULES,
    EMPTY_SITE_RULES,
    MAD_REFERENCES,
    MODELS,
    POOLS,
    PRECISION_CHOICES,
    WELL_POOLS,
    InferenceConfig,
)
from utils.inference.config import DEFAULTS as D
from utils.profiles import CONTROL_CHOICES, NORM_METHODS, OPERATIONS, SCOPES, STEPS


def build_parser() -> argparse.ArgumentParser:
    """The paper's inference flags (unchanged defaults where they were sound) plus ours; defaults live in
    ``InferenceConfig``."""
    p = FlagParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                   epilog=SPELLING_NOTE + " The paper's flags (first group) use underscores.")
    paper = p.add_argument_group("paper flags (the paper's spelling: underscores)")
    paper.add_argument("--model", choices=MODELS, default=D["model"],
                       help="checkpoint type, checked against the file (detected from it when omitted)")
    paper.add_argument("--arch", default=D["arch"], help="backbone for the paper's checkpoints")
    paper.add_argument("--ckpt", required=True, help="checkpoint: ours, or the paper's DINO/MAE .pth or SimCLR .ckpt")
    paper.add_argument("--valset", default=D["valset"], help="site CSV (paper or JUMP load_data columns)")
    paper.add_argument("--batch_size", type=int, default=D["batch_size"],
                       help="sites per device batch (tiles = sites x tiles/site)")
    paper.add_argument("--num_workers", type=int, default=D["num_workers"],
                       help="reader threads (0: read in the main thread)")
    paper.add_argument("-o", "--outdir", required=True, help="output folder")
    paper.add_argument("--size", type=int, default=D["size"], help="tile size in pixels")
    paper.add_argument("--stride", type=int, default=D["stride"], help="tile stride (default: --size)")
    paper.add_argument("--gpus", type=int, nargs="*", default=D["gpus"],
                       help="GPU id for a single process (default 0; torchrun uses one GPU per local rank)")
    paper.add_argument("--norm_method", default=D["norm_method"], metavar="CHAIN",
                       help=f"normalisation chain: the paper's methods ({', '.join(NORM_METHODS)}), 'all' (one "
                            f"folder per paper method), steps joined by _ ({', '.join(STEPS)}; name@controls "
                            f"fits a step on the controls), jump / jump_harmony, or a .json/.toml chain file; "
                            f"see docs/PROFILES.md")
    paper.add_argument("--operation", choices=OPERATIONS, default=D["operation"],
                       help="pooling of tiles into sites/wells and of wells into perturbations")
    paper.add_argument("--l2norm", action="store_true",
                       help="scale each well PROFILE to unit L2 norm before normalising (the paper scaled columns)")
    ours = p.add_argument_group("embedding")
    ours.add_argument("--pool", choices=POOLS, default=D["pool"],
                      help="token pooling: cls, patch mean after the final norm, or before it (the paper's MAE "
                           "embedding); default from the checkpoint: cls for DINO/SimCLR, mean for MAE")
    ours.add_argument("--layers", type=int, nargs="+", default=D["layers"],
                      help="embed from these blocks (0-based, negative from the end) and concatenate")
    ours.add_argument("--channels", nargs="+", default=list(D["channels"]),
                      help="channel names in file order; sites are permuted to the checkpoint's order")
    ours.add_argument("--intensity", default=D["intensity"],
                      help="override the checkpoint's intensity constants: a preset name or a JSON file")
    ours.add_argument("--image_root", default=D["image_root"], help="folder that relative image paths start from")
    add_metadata_flags(ours)
    ours.add_argument("--center-tiles", action="store_true",
                      help="centre the tile grid instead of dropping only the right/bottom border")
    ours.add_argument("--empty-sites", choices=EMPTY_SITE_RULES, default=D["empty_sites"],
                      help="site without valid tile: drop it (reported) or use its middle tile (the paper)")
    ours.add_argument("--well-pool", choices=WELL_POOLS, default=D["well_pool"],
                      help="well profile from all valid tiles of the well (the paper) or from its site profiles")
    ours.add_argument("--cell-factor", type=float, default=D["cell_factor"],
                      help="a pixel has cells above this fraction of the Otsu threshold")
    ours.add_argument("--min-cell-fraction", type=float, default=D["min_cell_fraction"],
                      help="a tile is valid with at least this fraction of cell pixels")
    ours.add_argument("--crop-mode", choices=CROP_MODES, default=D["crop_mode"],
                      help="tiles: the paper's tile grid; cells: one crop per nucleus (DeepProfiler / Cell-DINO), "
                           "pooled to sites and wells like tiles (docs/INFERENCE.md, Single-cell crops)")
    ours.add_argument("--crop-size", type=int, default=D["crop_size"],
                      help="cells: crop side in pixels around each nucleus, resized to --size for the model")
    ours.add_argument("--locations", default=D["locations"],
                      help="cells: folder of CellProfiler nucleus centres, <plate>/<well>-<site>-Nuclei.csv "
                           "(default: the site CSV's FileName_NucleiLocations column, else nucleus segmentation)")
    ours.add_argument("--edge-cells", choices=EDGE_RULES, default=D["edge_cells"],
                      help="cells: a crop crossing the image border is dropped (counted in run.json) or zero-padded")
    ours.add_argument("--max-cells", type=int, default=D["max_cells"],
                      help="cells: embed at most this many cells per site (a seeded choice per site; default all)")
    norm = p.add_argument_group("normalisation")
    norm.add_argument("--controls", default=D["controls"], choices=CONTROL_CHOICES,
                      help="negative controls: DMSO perturbation, control_type negcon, or negcon when annotated")
    norm.add_argument("--control-query", default=D["control_query"],
                      help="pandas query selecting control wells (overrides --controls)")
    norm.add_argument("--norm-scope", choices=SCOPES, default=D["norm_scope"],
                      help="paper: standardize/mad_robustize per plate, spherize over all plates")
    norm.add_argument("--batch-key", default=D["batch_key"],
                      help="metadata column Harmony corrects for (batch, plate, or a source column)")
    norm.add_argument("--mad-reference", choices=MAD_REFERENCES, default=D["mad_reference"],
                      help="mad_robustize statistics from all wells (the paper) or from control wells")
    run = p.add_argument_group("run")
    run.add_argument("--device", choices=DEVICES, default=D["device"], help="where to embed")
    run.add_argument("--precision", choices=PRECISION_CHOICES, default=D["precision"],
                     help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the backbone forward")
    run.add_argument("--resume", action="store_true", help="reuse finished plates in <outdir>/parts")
    run.add_argument("--skip_bad_images", action="store_true",
                     help="warn about and leave out unreadable images (listed in run.json) instead of stopping")
    run.add_argument("--save-sites", action="store_true",
                     help="also write site_features.csv (raw site profiles)")
    run.add_argument("--save-cells", action="store_true",
                     help="cells: also write cell_features.parquet (per-cell embeddings with plate, well, field, x, y)")
    run.add_argument("--parquet", action="store_true", help="also write parquet copies of the tables")
    run.add_argument("--local_rank", "--local-rank", type=int, default=D["local_rank"],
                     help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the flags into one InferenceConfig (validated there) and run the pipeline."""
    from utils.inference import run_inference  # lazy: --help must not pay for torch, timm and the models

    run_inference(InferenceConfig.from_flags(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    run_cli(main)
