"""``python -m utils.handcrafted``: the handcrafted baseline's command line, bad input reported as one line."""

from utils.cli import run_cli
from utils.handcrafted.cli import main

run_cli(main)
