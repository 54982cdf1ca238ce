"""Train SimCLR on Cell Painting sites (the paper's train_simclr.py flags): `python train_simclr.py --help`."""

from __future__ import annotations

import sys

from utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and hand them to the shared training loop."""
    from utils.train_args import parse_args
    from utils.training import train

    train("simclr", parse_args("simclr", sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
