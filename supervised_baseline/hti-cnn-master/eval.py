"""The paper's test command, unchanged: ``python supervised_baseline/hti-cnn-master/eval.py --config
supervised_baseline/hti-cnn-master/configs/fnn_dino_test.json --g 4 --j 2``.

A thin shim: the logic is in the ``supervised_baseline`` package (``python -m supervised_baseline eval``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, so the package imports

from supervised_baseline.cli import main  # noqa: E402
from utils.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: main(["eval", *sys.argv[1:]]))
