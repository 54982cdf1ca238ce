"""Fault injection: full disks, kills mid-write and mid-swap, two runs into one folder, refused resumes and
read-only folders. Each case checks what is left behind: the previous complete results, or nothing that looks
complete, and one ``error:`` line naming the path."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data.synthetic import generate_plates
from inference import build_parser
from models.checkpoints import load_checkpoint, save_checkpoint
from utils.cli import run_cli
from utils.errors import ConfigError, DataError
from utils.inference import InferenceConfig, pipeline
from utils.rundir import OutputLock, Transaction, completed_run, output_run, recover

ROOT = Path(__file__).resolve().parents[1]
DINO_TINY = ["--arch", "vit_debug_patch8", "--out_dim", "16", "--head_hidden_dim", "16", "--head_bottleneck_dim", "8",
             "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "1",
             "--batch_size_per_gpu", "2", "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1",
             "--use_fp16", "false", "--num_workers", "0", "--max_steps_per_epoch", "1", "--device", "cpu"]
FINAL = ("well_features.csv", "agg_features.csv", "run.json")


@pytest.fixture(scope="module")
def plates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fault_plates")
    generate_plates(out, plates=1, batches=1, wells=4, sites=1, size=64, seed=5, layout="merged", progress=False)
    return out


def _inference_args(data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--valset", str(data / "dataset.csv"), "-o", str(out), "--size", "32", "--stride",
            "32", "--batch_size", "4", "--num_workers", "1", "--norm_method", "no_post_proc", *extra]


def _infer(data: Path, ckpt: Path, out: Path, *extra: str) -> Path:
    cfg = InferenceConfig.from_flags(build_parser().parse_args(_inference_args(data, ckpt, out, *extra)))
    return pipeline.run_inference(cfg)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in FINAL}


def _limited(argv: list[str], limit: int, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run a CLI in a subprocess whose files may not grow past ``limit`` bytes: writes fail with EFBIG, as on a
    full disk (Python ignores SIGXFSZ, so the write returns the error instead of killing the process)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap)


def _one_error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in names), last
    return last


def _eval_inputs(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = [{"batch": f"B{p % 2}", "plate": f"p{p}", "well": f"A{i:02d}",
             "perturbation_id": "DMSO" if i >= 8 else f"P{i}", "target": "control" if i >= 8 else f"T{i % 4}"}
            for p in range(4) for i in range(10)]
    feats = pd.DataFrame(rng.normal(size=(len(rows), 6)), columns=[f"emb{i}" for i in range(6)])
    (root / "in" / "DINO").mkdir(parents=True)
    pd.concat([pd.DataFrame(rows), feats], axis=1).to_csv(root / "in" / "DINO" / "well_features.csv", index=False)
    return root / "in"


# --- the lock ---------------------------------------------------------------------------------------------------


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder`` (as a first run would, for as long as it runs)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from utils.rundir import OutputLock; OutputLock(sys.argv[2]).acquire(); "
                               "print('held', flush=True); time.sleep(120)", str(ROOT), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_folder_stops_a_second_run_naming_its_holder(tmp_path: Path) -> None:
    holder = _hold(tmp_path / "out")
    try:
        with pytest.raises(ConfigError) as info:
            OutputLock(tmp_path / "out").acquire()
        msg = str(info.value)
        assert f"pid {holder.pid}" in msg and "in use" in msg and "since" in msg and "\n" not in msg
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and the next run takes it over, saying so
    with pytest.warns(RuntimeWarning, match=f"stale lock of pid {holder.pid}"):
        lock = OutputLock(tmp_path / "out").acquire()
    assert json.loads((tmp_path / "out" / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "out" / ".lock").exists()


def test_a_second_run_into_a_held_folder(plates: Path, ckpt: Path, tmp_path: Path) -> None:
    """Inference and evaluate into a folder another run holds stop at once, naming it; nothing is written."""
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        proc = subprocess.run([sys.executable, "inference.py", *_inference_args(plates, ckpt, out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=240)
        _one_error_line(proc, str(out), f"in use by pid {holder.pid}")
        root = _eval_inputs(tmp_path)
        proc = subprocess.run([sys.executable, "evaluate.py", "-b", str(root.parent), "-i", "in", "-o", str(out),
                               "--null-size", "50", "--no-figures", "--no-progress"], cwd=ROOT, capture_output=True,
                              text=True, timeout=240)
        _one_error_line(proc, str(out), f"in use by pid {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    _infer(plates, ckpt, out)  # the holder is gone: its stale lock is taken over and the run completes
    assert completed_run(out)["status"] == "complete" and not (out / ".lock").exists()


# --- transactions -------------------------------------------------------------------------------------------------


def test_a_refused_resume_keeps_the_finished_results(plates: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _infer(plates, ckpt, out)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="--resume"):
        _infer(plates, ckpt, out, "--resume", "--size", "16", "--stride", "16")
    assert _snapshot(out) == before and not list(out.glob(".staging-*")) and not (out / ".lock").exists()


def test_a_kill_during_the_swap_is_finished_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with output_run(out) as tx:
        for name in ("a.csv", "b.csv"):
            tx.path(name).write_text("old\n")
        tx.commit({"status": "complete", "run": 1})
    real_replace, calls = os.replace, []

    def dies_after_one(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(dst)
        if len(calls) > 3:  # COMMIT's own atomic write and the first table go through; then the process "dies"
            raise KeyboardInterrupt
        real_replace(src, dst)

    tx = Transaction(out)
    for name in ("a.csv", "b.csv"):
        tx.path(name).write_text("new\n")
    monkeypatch.setattr(os, "replace", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        tx.commit({"status": "complete", "run": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    # a reader sees an interrupted commit, not a complete folder mixing both runs
    assert not (out / "run.json").exists()
    with pytest.raises(DataError, match="killed while swapping"):
        completed_run(out)
    assert recover(out) == [f"{out}: finished an interrupted commit (3 files)"]
    assert (out / "a.csv").read_text() == (out / "b.csv").read_text() == "new\n"
    assert completed_run(out) == {"status": "complete", "run": 2}


def test_evaluate_refuses_a_representation_killed_mid_swap(tmp_path: Path) -> None:
    """evaluate.py trusts a project folder through run.json only: tables of an interrupted swap are refused."""
    from utils.evaluation.loading import discover_representations

    rep = tmp_path / "reps" / "DINO"
    with output_run(rep) as tx:
        tx.path("well_features.csv").write_text("plate,well,emb0\np,A01,1\n")
        tx.commit({"status": "complete"})
    assert [name for name, _ in discover_representations(tmp_path / "reps")] == ["DINO"]
    staging = rep / ".staging-999999"
    staging.mkdir()
    (staging / "COMMIT").write_text(json.dumps({"files": ["well_features.csv"], "stale": []}))
    with pytest.raises(DataError, match="DINO: a run was killed while swapping"):
        discover_representations(tmp_path / "reps")
    (staging / "COMMIT").unlink()
    staging.rmdir()
    (rep / "run.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(DataError, match=r"run.json: status 'running', not 'complete'"):
        discover_representations(tmp_path / "reps")


def test_a_failed_run_leaves_no_staging_and_stale_files_go(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_run(out) as tx:
        tx.path("site_features.csv").write_text("old\n")
        tx.path("well_features.csv").write_text("old\n")
        tx.commit({"status": "complete"})
    with pytest.raises(RuntimeError), output_run(out) as tx:
        tx.path("well_features.csv").write_text("half")
        raise RuntimeError("the run failed")
    assert (out / "well_features.csv").read_text() == "old\n" and not list(out.glob(".staging-*"))
    with output_run(out) as tx:  # a rerun without --save-sites: the earlier site table does not survive it
        tx.path("well_features.csv").write_text("new\n")
        tx.commit({"status": "complete"}, stale=["site_features.csv", "well_features.csv", "run.json"])
    assert not (out / "site_features.csv").exists() and (out / "well_features.csv").read_text() == "new\n"


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    real_save = torch.save

    def killed(obj: object, f: str | os.PathLike[str]) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


# --- full disks ---------------------------------------------------------------------------------------------------


def test_disk_full_during_inference(plates: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _infer(plates, ckpt, out)
    before = _snapshot(out)
    (out / "parts").rename(tmp_path / "old_parts")  # the rerun must embed, and its writes then hit the limit
    proc = _limited(["inference.py", *_inference_args(plates, ckpt, out)], limit=3000)
    _one_error_line(proc, str(out))
    assert _snapshot(out) == before and not list(out.glob(".staging-*"))


def test_disk_full_during_evaluation(tmp_path: Path) -> None:
    root = _eval_inputs(tmp_path)
    proc = _limited(["evaluate.py", "-b", str(root.parent), "-i", "in", "-o", str(tmp_path / "eval"),
                     "--null-size", "50", "--replicate-null-size", "20", "--no-figures", "--no-progress"], limit=2000)
    _one_error_line(proc, str(tmp_path / "eval"))
    left = sorted(p.name for p in (tmp_path / "eval").iterdir()) if (tmp_path / "eval").exists() else []
    assert "well_metrics.csv" not in left and "run.json" not in left and not any(n.startswith(".") for n in left)


def test_disk_full_during_training_keeps_the_old_checkpoint(make_plate, tmp_path: Path) -> None:
    csv = make_plate(4)
    out = tmp_path / "train"
    args = ["train_dino.py", *DINO_TINY, "--path_df", str(csv), "--output_dir", str(out)]
    first = subprocess.run([sys.executable, *args, "--epochs", "1"], cwd=ROOT, capture_output=True, text=True,
                           timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "checkpoint.pth").read_bytes()
    proc = _limited([*args, "--epochs", "2"], limit=len(before) // 2)
    _one_error_line(proc, str(out))
    assert (out / "checkpoint.pth").read_bytes() == before
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1


# --- read-only folders --------------------------------------------------------------------------------------------


def test_read_only_output_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """EROFS from the file system (simulated, because root ignores permission bits) is one line naming the path."""
    root = _eval_inputs(tmp_path)
    out = tmp_path / "ro"

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system", str(out / ".lock"))

    monkeypatch.setattr(os, "link", read_only)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "-b", str(root.parent), "-i", "in", "-o", str(out),
                                      "--null-size", "50", "--no-figures", "--no-progress"])
    import evaluate  # the script's own main, as the command line runs it

    with pytest.raises(SystemExit) as info:
        run_cli(evaluate.main)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    expected = f"error: {out / '.lock'}: cannot lock the output folder (Read-only file system)"
    assert info.value.code == 2 and last == expected


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the EROFS case above covers it")
def test_permission_denied_output_folder(tmp_path: Path) -> None:
    root = _eval_inputs(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = subprocess.run([sys.executable, "evaluate.py", "-b", str(root.parent), "-i", "in", "-o", str(out),
                               "--null-size", "50", "--no-figures", "--no-progress"], cwd=ROOT, capture_output=True,
                              text=True, timeout=240)
        _one_error_line(proc, str(out))
    finally:
        out.chmod(0o755)
