"""``python -m utils.handcrafted``: the handcrafted baseline's command line."""

from utils.cli import run_cli
from utils.handcrafted.pipeline import main

run_cli(main)
