"""Train DINO on Cell Painting sites (the paper's train_dino.py flags): `python train_dino.py --help`."""

from __future__ import annotations

import sys

from utils.cli import run_cli
from utils.training import parse_config, train


def main(argv: list[str] | None = None) -> int:
    """Parse and validate the flags into one TrainConfig and hand it to the shared training loop."""
    train(parse_config("dino", sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
