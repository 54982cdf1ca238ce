"""The GPU check's pure pieces (registry, budgets, judges, table, JSON, exit code, timeouts) and its training-step
case on the CPU: the check runs on a lent GPU a few minutes at a time, so it must not fail there for a reason a CPU
could have caught."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    """bench/ is scripts, not a package: load one by path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


gc = _load("gpu_check")
steps = _load("gpu_steps")


def _ctx(tmp_path: Path, *, toy: bool = False, device: str = "cuda", gpus: int = 1, left: float = 400.0) -> object:
    return gc.Context(out=tmp_path, work=tmp_path / "work", device=device, toy=toy, gpus=gpus, python=sys.executable,
                      deadline=time.monotonic() + left)


def test_registry_has_the_six_steps_within_eight_minutes() -> None:
    names = [s.name for s in gc.STEPS]
    assert names == ["tests", "train_steps", "nccl", "inference", "bench_train", "learning"]
    assert sum(s.budget_s for s in gc.STEPS) + gc.RESERVE_S <= gc.TOTAL_S <= 480
    assert [s.takes_rest for s in gc.STEPS] == [False] * 5 + [True]  # only the last may use the others' leftovers
    assert set(gc.TEST_FILES) >= {"tests/test_training.py", "tests/test_inference.py", "tests/test_backbones.py"}
    assert all((ROOT / f).is_file() for f in gc.TEST_FILES)


def test_step_limit_is_cut_by_the_deadline(tmp_path: Path) -> None:
    tests, learning = gc.STEPS[0], gc.STEPS[-1]
    assert gc.step_limit(tests, _ctx(tmp_path, left=400)) == tests.budget_s
    assert gc.step_limit(tests, _ctx(tmp_path, left=30)) == pytest.approx(30, abs=1)
    assert gc.step_limit(learning, _ctx(tmp_path, left=300)) == pytest.approx(300, abs=1)


def test_exit_code_fails_only_on_fail_or_timeout() -> None:
    def res(status: str) -> object:
        return gc.StepResult(name=status, status=status, figure="", seconds=1.0, budget_s=10)

    assert gc.exit_code([res(gc.PASS), res(gc.SKIP), res(gc.RAN)]) == 0
    assert gc.exit_code([res(gc.PASS), res(gc.FAIL)]) == 1
    assert gc.exit_code([res(gc.TIMEOUT), res(gc.PASS)]) == 1
    assert gc.exit_code([]) == 0


def test_table_and_summary(tmp_path: Path) -> None:
    results = [
        gc.StepResult(name="train_steps", status=gc.FAIL, figure="1/2 pass", seconds=3.25, budget_s=35,
                      rows=[gc.Row("dino bf16", gc.PASS, "loss 8.3 -> 8.2", 1.0),
                            gc.Row("dino fp16", gc.FAIL, "x", None)]),
        gc.StepResult(name="nccl", status=gc.SKIP, figure="skipped (1 GPU)", seconds=0.0, budget_s=20),
    ]
    table = gc.format_table(results).splitlines()
    assert table[0] == "| step | status | key figure | seconds |"
    assert table[2] == "| train_steps | fail | 1/2 pass | 3.2 |"
    assert "dino fp16 | fail | x |  |" in table[4] and len(table) == 6
    machine = {"gpu_name": "NVIDIA H200", "driver": "580", "torch": "2.11", "date_utc": "2026-12-03T00:00:00+00:00"}
    report = gc.summary(results, machine, _ctx(tmp_path), 12.0)
    assert report["ok"] is False and report["exit_code"] == 1 and report["machine"] == machine
    assert [s["name"] for s in report["steps"]] == ["train_steps", "nccl"]
    assert json.loads(json.dumps(report))["steps"][0]["rows"][1]["status"] == gc.FAIL


def test_judges_read_the_tools_outputs(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    assert gc.tests_judge(ctx, 0, "....\n==== 120 passed, 5 skipped in 61.02s ====\n").figure == \
        "120 passed, 5 skipped in 61.02s"
    assert gc.tests_judge(ctx, 1, "F\n1 failed, 3 passed in 2.0s\n").status == gc.FAIL
    line = ("bench_inference [NVIDIA H200] vit_small bf16: 1080px sites, 16 tiles/site of 224px, batch 64 sites, 14 "
            "reader threads | pipeline 812.5 sites/s (end to end incl. normalisation and CSVs: 700.1) | bare forward "
            "900.0 sites/s | ratio 0.90")
    verdict = gc.inference_judge(ctx, 0, f"noise\n{line}\n")
    assert verdict.status == gc.PASS and verdict.details["ratio"] == 0.90
    assert gc.inference_judge(ctx, 1, "Traceback\nRuntimeError: CUDA out of memory\n").figure == \
        "exit 1: RuntimeError: CUDA out of memory"
    cases = [{"method": "dino", "precision": "bf16", "status": "pass", "reason": "", "losses": [8.3, 8.2],
              "step_ms": 40.0, "batch": 16, "arch": "vit_small", "seconds": 2.0},
             {"method": "dino", "precision": "fp16", "status": "fail", "reason": "non-finite loss",
              "losses": [math.nan], "step_ms": 41.0, "batch": 16, "arch": "vit_small", "seconds": 2.0}]
    verdict = gc.train_steps_judge(ctx, 1, f"{gc.MARK} {json.dumps(cases)}\n")
    assert verdict.status == gc.FAIL and verdict.figure == "1/2 pass" and len(verdict.rows) == 2


def test_nccl_runs_only_with_two_gpus(tmp_path: Path) -> None:
    assert gc.nccl_command(_ctx(tmp_path, gpus=1), 20).figure == "skipped (1 GPU)"
    assert gc.nccl_command(_ctx(tmp_path, gpus=0), 20).status == gc.FAIL  # a GPU run without CUDA fails
    assert "--nproc_per_node" in gc.nccl_command(_ctx(tmp_path, gpus=2), 20)
    assert "--toy" in gc.nccl_command(_ctx(tmp_path, toy=True, device="cpu", gpus=0), 20)  # gloo in the dry run


def test_learning_passes_only_above_its_random_init(tmp_path: Path) -> None:
    path = tmp_path / "work" / "learning" / "dino" / "learning.json"
    path.parent.mkdir(parents=True)

    def judge(final: float, toy: bool = False) -> object:
        probe = [{"epoch": 0, "target_map": 0.20, "replicate_map": 0.4},
                 {"epoch": 40, "target_map": final, "replicate_map": 0.5}]
        path.write_text(json.dumps({"probe": probe, "epochs": 40, "collapsed": False}))
        return gc.learning_judge(_ctx(tmp_path, toy=toy), 0, "")

    assert judge(0.25).status == gc.PASS
    assert judge(0.20).status == gc.FAIL and judge(0.15).status == gc.FAIL
    assert judge(0.15, toy=True).status == gc.RAN
    assert gc.learning_minutes(_ctx(tmp_path), 600) == gc.LEARNING_MAX_MINUTES
    assert gc.learning_minutes(_ctx(tmp_path), 190) == pytest.approx((190 - gc.LEARNING_SETUP_S) / 60, abs=0.01)


def test_runner_kills_a_step_at_its_timeout_and_survives_a_broken_judge(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; print('started', flush=True); "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]
    slow = gc.Step("slow", 2, lambda ctx, limit: sleeper, gc.tests_judge)
    broken = gc.Step("broken", 10, lambda ctx, limit: [sys.executable, "-c", "print('hi')"],
                     lambda ctx, rc, out: 1 / 0)
    t0 = time.monotonic()
    with open(tmp_path / "log", "wb", buffering=0) as log:
        results = gc.run_all((slow, broken), _ctx(tmp_path), log, gc.child_env(toy=True))
    assert time.monotonic() - t0 < 15
    assert [r.status for r in results] == [gc.TIMEOUT, gc.FAIL]
    assert "ZeroDivisionError" in results[1].figure
    text = (tmp_path / "log").read_text()
    assert "started" in text and "hi" in text and "===== broken" in text


@pytest.mark.parametrize("method", steps.METHODS)
def test_one_real_bf16_training_step_on_the_cpu(method: str) -> None:
    torch.manual_seed(0)
    case = steps.train_step_case(method, "bf16", torch.device("cpu"), toy=True, steps=2)
    assert case["status"] == "pass", case
    assert all(math.isfinite(x) for x in case["losses"]) and case["changed_tensors"] > 0
    assert steps.train_step_case(method, "fp16", torch.device("cpu"), toy=True)["status"] == "skip"
