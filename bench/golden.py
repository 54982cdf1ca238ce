"""Golden runs for refactors: record the outputs of the demo, a 2-process torchrun inference and a resumed training
run, then compare two recordings byte for byte (deterministic files) or to 1e-6 (numbers).

Why: a restructuring must not change any number. ``record`` runs the real entry points (no shell strings), so the
comparison covers exactly what users run. Usage::

    python bench/golden.py record /tmp/golden/before
    python bench/golden.py record /tmp/golden/after
    python bench/golden.py compare /tmp/golden/before /tmp/golden/after
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TOL = 1e-6
TRAIN = ["--preset", "small_cpu", "--epochs", "2", "--max_steps_per_epoch", "3", "--num_workers", "0",
         "--saveckp_freq", "1", "--device", "cpu"]
# Keys of run.json / log.txt that hold clocks, paths or the command line, which differ between any two runs. A
# checkpoint file stores its own output path in "args", so its sha256 differs too: its tensors are compared instead.
VOLATILE = {"timings", "seconds", "command", "path", "versions", "img_per_s", "time", "elapsed_s", "outdir",
            "valset", "ckpt", "output_dir", "path_df", "date", "embed_seconds", "sites_per_second", "outputs",
            "step_s", "data_s", "probe_seconds", "wall_s", "pool_seconds", "epoch_time_s", "sha256",
            "checkpoint_sha256"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def record(out: Path) -> None:
    """Run the three golden cases into ``out`` (deleted first)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    demo = out / "demo"
    _call(["make", "-s", "demo", f"DEMO_DIR={demo}"])
    plates = demo / "plates" / "dataset.csv"
    _call([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", "inference.py",
           "--model", "dino", "--ckpt", str(demo / "checkpoints" / "DINO" / "checkpoint.pth"), "--valset", str(plates),
           "--size", "128", "--stride", "128", "--batch_size", "8", "--num_workers", "0", "--arch", "vit_tiny",
           "--device", "cpu", "--save-sites", "-o", str(out / "torchrun")])
    straight, resumed = out / "train_straight", out / "train_resumed"
    _call([PY, "train_dino.py", *TRAIN, "--path_df", str(plates), "--output_dir", str(straight)])
    resumed.mkdir()
    shutil.copy(straight / "checkpoint0001.pth", resumed / "checkpoint.pth")
    _call([PY, "train_dino.py", *TRAIN, "--path_df", str(plates), "--output_dir", str(resumed)])


def _strip(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def _same_frame(a: Path, b: Path) -> str:
    if a.read_bytes() == b.read_bytes():
        return "bytes"
    fa, fb = pd.read_csv(a), pd.read_csv(b)
    if list(fa.columns) != list(fb.columns) or fa.shape != fb.shape:
        raise AssertionError(f"{a.name}: columns or shape differ")
    num = fa.select_dtypes("number").columns
    other = [c for c in fa.columns if c not in num]
    if not fa[other].astype(str).equals(fb[other].astype(str)):
        raise AssertionError(f"{a.name}: metadata differs")
    diff = np.nanmax(np.abs(fa[num].to_numpy(float) - fb[num].to_numpy(float))) if len(num) else 0.0
    if not (np.isnan(fa[num].to_numpy(float)) == np.isnan(fb[num].to_numpy(float))).all() or diff > TOL:
        raise AssertionError(f"{a.name}: max difference {diff:.3g} > {TOL}")
    return f"max |diff| {diff:.1e}"


def _same_checkpoint(a: Path, b: Path) -> str:
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    worst = 0.0
    for part in ("backbone", "heads"):
        if ca[part].keys() != cb[part].keys():
            raise AssertionError(f"{a}: {part} keys differ")
        for key in ca[part]:
            ta, tb = ca[part][key], cb[part][key]
            if ta.is_floating_point():
                worst = max(worst, float((ta.double() - tb.double()).abs().max()) if ta.numel() else 0.0)
            elif not torch.equal(ta, tb):
                raise AssertionError(f"{a}: {part}.{key} differs")
    if worst > TOL or ca["epoch"] != cb["epoch"] or ca["step"] != cb["step"]:
        raise AssertionError(f"{a}: weights differ by {worst:.3g}")
    return "bytes-equal tensors" if worst == 0 else f"max |diff| {worst:.1e}"


def _same_text(a: Path, b: Path, roots: tuple[Path, Path]) -> str:
    """Byte-equal once each recording's own root folder is blanked (summary.md names its input folder)."""
    if a.read_bytes() == b.read_bytes():
        return "bytes"
    if a.read_text().replace(str(roots[0]), "<root>") != b.read_text().replace(str(roots[1]), "<root>"):
        raise AssertionError("text differs")
    return "bytes equal apart from the recording's root folder"


def _same_json(a: Path, b: Path) -> str:
    if _strip(json.loads(a.read_text())) != _strip(json.loads(b.read_text())):
        raise AssertionError("records differ")
    return "equal (clocks and paths excluded)"


def _same_json_lines(a: Path, b: Path) -> str:
    la = [_strip(json.loads(x)) for x in a.read_text().splitlines()]
    lb = [_strip(json.loads(x)) for x in b.read_text().splitlines()]
    if la != lb:
        raise AssertionError(f"{a}: records differ")
    return f"{len(la)} records equal (clocks excluded)"


def compare(before: Path, after: Path) -> int:
    """Compare every golden file of two recordings; print one line each and return the number of differences."""
    checks: list[tuple[str, object]] = []
    for path in sorted(before.rglob("*")):
        rel = path.relative_to(before)
        if not path.is_file() or "parts" in rel.parts or "events.out" in path.name or "plates" in rel.parts:
            continue
        if path.suffix == ".csv":
            checks.append((str(rel), _same_frame))
        elif path.name == "summary.md":
            checks.append((str(rel), lambda a, b: _same_text(a, b, (before, after))))
        elif path.name == "checkpoint.pth":
            checks.append((str(rel), _same_checkpoint))
        elif path.name == "log.txt":
            checks.append((str(rel), _same_json_lines))
        elif path.name == "run.json":
            checks.append((str(rel), _same_json))
    failures = 0
    for rel, check in checks:
        other = after / rel
        try:
            if not other.is_file():
                raise AssertionError("missing")
            print(f"ok    {rel}: {check(before / rel, other)}")
        except AssertionError as exc:
            failures += 1
            print(f"DIFF  {rel}: {exc}")
    print(f"golden: {len(checks) - failures}/{len(checks)} files equal")
    return failures


def main() -> int:
    """``record OUT`` or ``compare BEFORE AFTER``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("record").add_argument("out", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = p.parse_args()
    if args.cmd == "record":
        record(args.out)
        return 0
    return 1 if compare(args.before, args.after) else 0


if __name__ == "__main__":
    sys.exit(main())
