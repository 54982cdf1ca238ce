"""Embed Cell Painting sites with a DINO, MAE or SimCLR backbone into normalised well profiles (the paper's flags)."""

from __future__ import annotations

import argparse

from data.schema import DEFAULT_CHANNELS
from utils.cli import run_cli
from utils.profiles import NORM_CHOICES, SCOPES

MODELS = ("dino", "mae", "simclr")


def build_parser() -> argparse.ArgumentParser:
    """The paper's inference flags (unchanged defaults where they were sound) plus ours."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    paper = p.add_argument_group("paper flags")
    paper.add_argument("--model", choices=MODELS, default=None,
                       help="checkpoint type, checked against the file (detected from it when omitted)")
    paper.add_argument("--arch", default="vit_small_patch16", help="backbone for the paper's checkpoints")
    paper.add_argument("--ckpt", required=True, help="checkpoint: ours, or the paper's DINO/MAE .pth or SimCLR .ckpt")
    paper.add_argument("--valset", default="data/JUMP_valset.csv", help="site CSV (paper or JUMP load_data columns)")
    paper.add_argument("--batch_size", type=int, default=32, help="sites per device batch (tiles = sites x tiles/site)")
    paper.add_argument("--num_workers", type=int, default=6, help="reader threads (0: read in the main thread)")
    paper.add_argument("-o", "--outdir", required=True, help="output folder")
    paper.add_argument("--size", type=int, default=224, help="tile size in pixels")
    paper.add_argument("--stride", type=int, default=None, help="tile stride (default: --size)")
    paper.add_argument("--gpus", type=int, nargs="*", default=None,
                       help="GPU id for a single process (default 0; torchrun uses one GPU per local rank)")
    paper.add_argument("--norm_method", choices=NORM_CHOICES, default="spherize_mad_robustize",
                       help="pycytominer post-processing; 'all' writes one folder per method")
    paper.add_argument("--operation", choices=("mean", "median"), default="mean",
                       help="pooling of tiles into sites/wells and of wells into perturbations")
    paper.add_argument("--l2norm", action="store_true",
                       help="scale each well PROFILE to unit L2 norm before normalising (the paper scaled columns)")
    ours = p.add_argument_group("embedding")
    ours.add_argument("--pool", choices=("cls", "mean", "mean_prenorm"), default=None,
                      help="token pooling: cls, patch mean after the final norm, or before it (the paper's MAE "
                           "embedding); default from the checkpoint: cls for DINO/SimCLR, mean for MAE")
    ours.add_argument("--layers", type=int, nargs="+", default=None,
                      help="embed from these blocks (0-based, negative from the end) and concatenate")
    ours.add_argument("--channels", nargs="+", default=list(DEFAULT_CHANNELS),
                      help="channel names in file order; sites are permuted to the checkpoint's order")
    ours.add_argument("--intensity", default=None,
                      help="override the checkpoint's intensity constants: a preset name or a JSON file")
    ours.add_argument("--image_root", default=None, help="folder that relative image paths start from")
    ours.add_argument("--center-tiles", dest="center_tiles", action="store_true",
                      help="centre the tile grid instead of dropping only the right/bottom border")
    ours.add_argument("--empty-sites", dest="empty_sites", choices=("drop", "center"), default="drop",
                      help="site without valid tile: drop it (reported) or use its middle tile (the paper)")
    ours.add_argument("--well-pool", dest="well_pool", choices=("tiles", "sites"), default="tiles",
                      help="well profile from all valid tiles of the well (the paper) or from its site profiles")
    ours.add_argument("--cell-factor", dest="cell_factor", type=float, default=0.7,
                      help="a pixel has cells above this fraction of the Otsu threshold")
    ours.add_argument("--min-cell-fraction", dest="min_cell_fraction", type=float, default=0.01,
                      help="a tile is valid with at least this fraction of cell pixels")
    norm = p.add_argument_group("normalisation")
    norm.add_argument("--controls", default="auto", choices=("auto", "DMSO", "negcon"),
                      help="negative controls: DMSO perturbation, control_type negcon, or negcon when annotated")
    norm.add_argument("--control-query", dest="control_query", default=None,
                      help="pandas query selecting control wells (overrides --controls)")
    norm.add_argument("--norm-scope", dest="norm_scope", choices=SCOPES, default="paper",
                      help="paper: standardize/mad_robustize per plate, spherize over all plates")
    norm.add_argument("--mad-reference", dest="mad_reference", choices=("all", "controls"), default="all",
                      help="mad_robustize statistics from all wells (the paper) or from control wells")
    run = p.add_argument_group("run")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to embed")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the backbone forward")
    run.add_argument("--resume", action="store_true", help="reuse finished plates in <outdir>/parts")
    run.add_argument("--skip_bad_images", action="store_true",
                     help="warn about and leave out unreadable images (listed in run.json) instead of stopping")
    run.add_argument("--save-sites", dest="save_sites", action="store_true",
                     help="also write site_features.csv (raw site profiles)")
    run.add_argument("--parquet", action="store_true", help="also write parquet copies of the tables")
    run.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                     help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run the pipeline."""
    from utils.inference import run_inference

    run_inference(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
