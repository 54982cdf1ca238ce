"""``python -m supervised_baseline {train,eval,compare}``."""

import sys

from supervised_baseline.cli import main
from utils.cli import run_cli

run_cli(lambda: main(sys.argv[1:]))
