"""``python -m utils.profiles``: the chain runner's command line, bad input reported as one line."""

from utils.cli import run_cli
from utils.profiles.cli import main

run_cli(main)
