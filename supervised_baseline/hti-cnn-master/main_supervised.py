"""The paper's training command, unchanged: ``python supervised_baseline/hti-cnn-master/main_supervised.py --config
supervised_baseline/hti-cnn-master/configs/fnn_dino.json --g 1 --j 2 --training.batchsize 128``.

A thin shim: the logic is in the ``supervised_baseline`` package (``python -m supervised_baseline train``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, so the package imports

from supervised_baseline.cli import main  # noqa: E402
from utils.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: main(["train", *sys.argv[1:]]))
