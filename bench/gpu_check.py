"""The one prepared GPU check: six steps, each with its own timeout, one table and one JSON summary at the end.

A session lent a GPU gets a few minutes of device time in all, so everything the CPU cannot test runs in one call of
at most 8 minutes: the tests with CUDA paths, one training step per method in bf16 and fp16, a 2-process NCCL run
(when 2+ GPUs are visible), inference and training throughput against their bare model bounds, and a short DINO run
on 1080 px synthetic plates whose retrieval probe must beat its own random initialisation. A failing or timed-out
step never stops the others; the exit code is 1 when any step failed. ``$OUT`` gets few files (the device tool brings
back at most 8): gpu_check.json (machine, per-step results), gpu_check.log (every step's output, in order),
bench_train.json and bench_inference.json. Scratch data goes to ``--work``, which does not come back.

    bash bench/gpu_check.sh                                     # on the GPU machine (installs .whl/ first)
    python bench/gpu_check.py --out gpu_check_out               # the same without the wheel install
    python bench/gpu_check.py --dry-run --out /tmp/gpucheck     # every step at toy size on the CPU (~2 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.fileio import write_json_atomic  # noqa: E402

TOTAL_S = 480  # the whole check, wheel install included, must end within 8 minutes of device time
RESERVE_S = 20  # wheel install, machine info, the table and the JSON: the budgets below sum to TOTAL_S - RESERVE_S
FINISH_S = 10  # of which the table and the JSON after the last step
MIN_START_S = 5  # a step is not started with less time than this before the deadline
PASS, FAIL, SKIP, RAN, TIMEOUT = "pass", "fail", "skip", "ran", "timeout"
FAILED = (FAIL, TIMEOUT)
MARK = "GPU_CHECK_RESULT"  # bench/gpu_steps.py's result line
TEST_FILES = ("tests/test_backbones.py", "tests/test_augment.py", "tests/test_tiling.py", "tests/test_intensity.py",
              "tests/test_cellmask.py", "tests/test_training.py", "tests/test_inference.py", "tests/test_supervised.py")
# The learning check: the small_cpu DINO recipe (docs/LEARNING.md) on 1080 px plates, with the loader widened for
# 16 cores and more epochs than the CPU's 30, since a GPU runs them in a fraction of the time; --max_minutes ends it.
LEARNING_GPU_EXTRA = ["--epochs", "100", "--probe_every", "20"]
LEARNING_SETUP_S = 80  # plates (16 cores), dataset statistics, first and last probe, the last epoch's overrun
LEARNING_MAX_MINUTES = 4.0
TEST_WORKERS = 8  # pytest-xdist workers for the tests step, each with TEST_THREADS torch threads (16 cores)
TEST_THREADS = "2"


@dataclass(frozen=True)
class Context:
    """Where and how the check runs; ``toy`` shrinks every step to seconds on the CPU (the dry run)."""

    out: Path
    work: Path
    device: str
    toy: bool
    gpus: int
    python: str
    deadline: float  # time.monotonic() by which every step must have ended

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Row:
    """One table line: a step, or one case of a step (indented under it)."""

    step: str
    status: str
    figure: str
    seconds: float | None


@dataclass
class Verdict:
    """What a step's judge (or a step that cannot run here) concludes; ``details`` go into the JSON only."""

    status: str
    figure: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """A finished step, as the table and the JSON report it."""

    name: str
    status: str
    figure: str
    seconds: float
    budget_s: int
    limit_s: float | None = None
    rc: int | None = None
    command: list[str] | None = None
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


Command = Callable[[Context, float], "list[str] | Verdict"]
Judge = Callable[[Context, int, str], Verdict]


@dataclass(frozen=True)
class Step:
    """A registry entry: the command for this context and time limit (or a verdict when it cannot run) and a judge
    of its exit code and output. ``takes_rest`` lets the last step use the time the others left unused; ``env``
    are environment variables for this step only."""

    name: str
    budget_s: int
    command: Command
    judge: Judge
    takes_rest: bool = False
    env: tuple[tuple[str, str], ...] = ()


# ---- the steps -------------------------------------------------------------------------------------------------


def _no_cuda(ctx: Context) -> Verdict | None:
    """A GPU run on a machine without CUDA fails every CUDA step at once instead of timing out in each."""
    if ctx.device == "cuda" and ctx.gpus == 0:
        return Verdict(FAIL, "CUDA not available")
    return None


def last_error(output: str) -> str:
    """The line that says what went wrong (an ``error:`` line or an exception's), for the table of a failed step."""
    lines = [x.strip() for x in output.replace("\r", "\n").splitlines() if x.strip()]
    pattern = re.compile(r"^(error:|\w+(Error|Exception)\b|FAILED|E  )")
    found = [x for x in lines if pattern.match(x)]
    text = (found or lines or ["no output"])[-1]
    return text if len(text) <= 160 else text[:157] + "..."


def tests_command(ctx: Context, limit: float) -> list[str] | Verdict:
    """The test files with CUDA paths, over TEST_WORKERS pytest-xdist workers where the image has xdist (its 16 cores
    would idle otherwise); the dry run only collects them (the full files take minutes on a 2-core CPU)."""
    base = [ctx.python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TEST_FILES]
    if ctx.toy:
        return [*base, "--collect-only"]
    return [*base, "-n", str(TEST_WORKERS)] if importlib.util.find_spec("xdist") else base


def tests_judge(ctx: Context, rc: int, output: str) -> Verdict:
    """pytest's closing summary line is the figure."""
    lines = [x.strip("= ") for x in output.replace("\r", "\n").splitlines()]
    summary = [x for x in lines if re.search(r"\d+ (passed|failed|errors?|skipped|tests? collected)", x)]
    figure = summary[-1] if summary else f"exit {rc}, no pytest summary"
    if ctx.toy:
        figure += " (dry run: collected, not run)"
    return Verdict(PASS if rc == 0 else FAIL, figure)


def train_steps_command(ctx: Context, limit: float) -> list[str] | Verdict:
    return _no_cuda(ctx) or [ctx.python, "bench/gpu_steps.py", "train", "--device", ctx.device,
                             "--precisions", "bf16", "fp16", *(["--toy"] if ctx.toy else [])]


def result_line(output: str) -> Any:
    """The JSON of the last ``GPU_CHECK_RESULT`` line, or None."""
    found = [x[len(MARK):].strip() for x in output.splitlines() if x.startswith(MARK)]
    return json.loads(found[-1]) if found else None


def train_steps_judge(ctx: Context, rc: int, output: str) -> Verdict:
    """One row per (method, precision): loss first -> last, mean step time, the failure reason if any."""
    cases = result_line(output)
    if not cases:
        return Verdict(FAIL, f"exit {rc}: {last_error(output)}")
    rows = []
    for c in cases:
        if c["status"] == SKIP:
            figure = f"skipped ({c['reason']})"
        elif "losses" in c:
            scale = f", grad scale {c['grad_scale']:g}" if c.get("grad_scale") else ""
            figure = (f"loss {c['losses'][0]:.3f} -> {c['losses'][-1]:.3f}, {c['step_ms']:.1f} ms/step "
                      f"(batch {c['batch']}, {c['arch']}{scale})" + (f": {c['reason']}" if c["reason"] else ""))
        else:
            figure = c["reason"]
        rows.append(Row(f"{c['method']} {c['precision']}", c["status"], figure, c.get("seconds")))
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, FAIL, SKIP)}
    status = FAIL if counts[FAIL] or rc != 0 else PASS
    figure = f"{counts[PASS]}/{len(rows)} pass" + (f", {counts[SKIP]} skipped" if counts[SKIP] else "")
    return Verdict(status, figure, rows, {"cases": cases})


def nccl_command(ctx: Context, limit: float) -> list[str] | Verdict:
    """2 processes over NCCL where 2+ GPUs are visible; the dry run runs the same check over gloo on the CPU."""
    if not ctx.toy:
        if no := _no_cuda(ctx):
            return no
        if ctx.gpus < 2:
            return Verdict(SKIP, f"skipped ({ctx.gpus} GPU)")
    return [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "bench/gpu_steps.py",
            "ddp", "--device", ctx.device, *(["--toy"] if ctx.toy else [])]


def nccl_judge(ctx: Context, rc: int, output: str) -> Verdict:
    result = result_line(output)
    if not result:
        return Verdict(FAIL, f"exit {rc}: {last_error(output)}")
    bad = [k for k, ok in result["checks"].items() if not ok]
    figure = (f"{result['backend']} x{result['world_size']} on {result['device']}: all_reduce, all_gather, DDP step "
              f"{result['step_ms']:.1f} ms, replicas identical" if not bad else f"failed: {', '.join(bad)}")
    if ctx.toy:
        figure += " (dry run: gloo, not NCCL)"
    return Verdict(PASS if rc == 0 and result["status"] == PASS else FAIL, figure, details=result)


def inference_command(ctx: Context, limit: float) -> list[str] | Verdict:
    """bench_inference.py's GPU preset at 2048 sites and 3 repeats (its 4096 x 5 do not fit the 8 minutes)."""
    out = ["--out", str(ctx.out / "bench_inference.json")]
    if ctx.toy:
        return [ctx.python, "bench/bench_inference.py", "--device", "cpu", "--sites", "24", "--plates", "1", "--unique",
                "8", "--site", "256", "--batch_size", "4", "--workers", "1", "--repeats", "1", *out]
    return _no_cuda(ctx) or [ctx.python, "bench/bench_inference.py", "--device", "cuda", "--sites", "2048",
                             "--repeats", "3", *out]


def inference_judge(ctx: Context, rc: int, output: str) -> Verdict:
    """The figure is from bench_inference.py's own line: pipeline and bare-forward sites/s (best) and the ratio
    (the median of the repeats); its JSON goes into the details."""
    line = next((x for x in reversed(output.splitlines()) if x.startswith("bench_inference")), "")
    found = {k: re.search(pattern, line) for k, pattern in (
        ("pipeline_sites_s", r"pipeline ([\d.]+) sites/s"), ("bare_sites_s", r"bare forward ([\d.]+) sites/s"),
        ("ratio", r"ratio ([\d.]+)"))}
    if rc != 0 or not all(found.values()):
        return Verdict(FAIL, f"exit {rc}: {last_error(output)}")
    values = {k: float(m.group(1)) for k, m in found.items() if m}
    path = ctx.out / "bench_inference.json"
    details = {**values, "line": line, "json": json.loads(path.read_text()) if path.is_file() else None}
    return Verdict(PASS, f"pipeline {values['pipeline_sites_s']:.1f} / bare {values['bare_sites_s']:.1f} sites/s, "
                         f"ratio {values['ratio']:.2f}", details=details)


def bench_train_command(ctx: Context, limit: float) -> list[str] | Verdict:
    """bench_train.py with shorter windows (10 timed steps x 2 rounds, 256 sites) to fit its budget."""
    common = ["--out", str(ctx.out / "bench_train.json"), "--data_dir", str(ctx.work / "bench_train_data")]
    if ctx.toy:
        return [ctx.python, "bench/bench_train.py", "--device", "cpu", "--arch", "vit_debug", "--steps", "1",
                "--rounds", "1", "--warmup", "0", "--sites", "8", "--site_size", "256", "--num_workers", "0", *common]
    return _no_cuda(ctx) or [ctx.python, "bench/bench_train.py", "--device", "cuda", "--steps", "10", "--warmup", "3",
                             "--rounds", "2", "--sites", "256", *common]


def bench_train_judge(ctx: Context, rc: int, output: str) -> Verdict:
    """Per method: data-fed img/s against the bare step's, from bench_train.json (else its summary line)."""
    path = ctx.out / "bench_train.json"
    results = json.loads(path.read_text()) if rc == 0 and path.is_file() else []
    if results:
        rows = [Row(r["method"], PASS, f"data {r['data_img_s']:.1f} / bare {r['bare_img_s']:.1f} img/s, ratio "
                                       f"{r['ratio']:.2f} ({r['precision']}, batch {r['batch']})", None)
                for r in results]
        return Verdict(PASS, ", ".join(f"{r['method']} {r['ratio']:.2f}" for r in results), rows,
                       {"results": results})
    line = next((x for x in reversed(output.splitlines()) if x.startswith("bench_train summary")), "")
    if rc == 0 and line:
        return Verdict(PASS, line.removeprefix("bench_train summary: "))
    return Verdict(FAIL, f"exit {rc}: {last_error(output)}")


def learning_minutes(ctx: Context, limit: float) -> float:
    """Training minutes that leave the step's set-up and final probe inside its limit (toy: a few epochs)."""
    if ctx.toy:
        return 0.4
    return round(max(0.5, min(LEARNING_MAX_MINUTES, (limit - LEARNING_SETUP_S) / 60)), 2)


def learning_command(ctx: Context, limit: float) -> list[str] | Verdict:
    """bench_learning.py's DINO run (the handcrafted baseline is skipped: cp-measure on 1080 px sites takes long)."""
    if no := _no_cuda(ctx):
        return no
    out = ctx.work / "learning" / "dino"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time; the plates in learning/plates are reused
    workers = max(1, (os.cpu_count() or 2) - 1)
    cmd = [ctx.python, "bench/bench_learning.py", "--method", "dino", "--seed", "0", "--minutes",
           str(learning_minutes(ctx, limit)), "--out", str(out), "--data", str(ctx.work / "learning" / "plates"),
           "--no_handcrafted"]
    if ctx.toy:
        return [*cmd, "--site_size", "256", "--wells", "8", "--workers", "1", "--extra", "--device", "cpu",
                "--num_workers", "0", "--epochs", "2", "--probe_every", "1", "--batch_size_per_gpu", "8"]
    return [*cmd, "--site_size", "1080", "--workers", str(workers), "--extra", "--device", "cuda", "--num_workers",
            str(min(12, workers)), *LEARNING_GPU_EXTRA]


def learning_judge(ctx: Context, rc: int, output: str) -> Verdict:
    """Pass when the final probe's target mAP beats the epoch-0 probe (the run's own random initialisation).

    At toy size the run is far too short to learn, so the dry run reports the figures without a verdict.
    """
    path = ctx.work / "learning" / "dino" / "learning.json"
    if rc != 0 or not path.is_file():
        return Verdict(FAIL, f"exit {rc}: {last_error(output)}")
    result = json.loads(path.read_text())
    first, final = result["probe"][0], result["probe"][-1]
    gain = final["target_map"] - first["target_map"]
    figure = (f"target mAP {first['target_map']:.3f} -> {final['target_map']:.3f} ({gain:+.3f}), replicate "
              f"{first['replicate_map']:.3f} -> {final['replicate_map']:.3f}, {result['epochs']} epochs"
              + (", collapsed" if result["collapsed"] else ""))
    if ctx.toy:
        return Verdict(RAN, figure + " (dry run: no verdict)", details={"learning": result})
    return Verdict(PASS if gain > 0 else FAIL, figure, details={"learning": result})


# Order: the quick correctness checks first, the benchmarks after, the learning run last so it can use the time
# the others did not (its budget is a floor). The budgets are also each step's timeout.
STEPS: tuple[Step, ...] = (
    Step("tests", 75, tests_command, tests_judge, env=(("OMP_NUM_THREADS", TEST_THREADS),)),
    Step("train_steps", 35, train_steps_command, train_steps_judge),
    Step("nccl", 20, nccl_command, nccl_judge),
    Step("inference", 70, inference_command, inference_judge),
    Step("bench_train", 75, bench_train_command, bench_train_judge),
    Step("learning", 185, learning_command, learning_judge, takes_rest=True),
)


# ---- running -----------------------------------------------------------------------------------------------------


def step_limit(step: Step, ctx: Context) -> float:
    """The step's timeout: its budget, cut to what is left before the deadline (the last step: all that is left)."""
    left = ctx.remaining()
    return max(0.0, left) if step.takes_rest else max(0.0, min(float(step.budget_s), left))


def run_command(cmd: list[str], limit: float, log: IO[bytes], env: dict[str, str]) -> tuple[int | None, str]:
    """Run one command in its own process group, its output appended to ``log``; kill the group on timeout.

    The group matters: DataLoader workers and torchrun's children would otherwise outlive a killed parent (and
    hold GPU memory or write to the log during the next step).
    Returns (exit code or None after a timeout, the command's output).
    """
    log.flush()
    start = log.tell()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc: int | None = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        rc = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):  # whatever is left of the group (also after a normal exit)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.flush()
    with open(log.name, "rb") as f:
        f.seek(start)
        return rc, f.read().decode(errors="replace")


def run_step(step: Step, ctx: Context, log: IO[bytes], env: dict[str, str]) -> StepResult:
    """Build, run and judge one step; nothing it does (a crash of the judge included) stops the check."""
    t0 = time.monotonic()
    limit = step_limit(step, ctx)
    base = {"name": step.name, "budget_s": step.budget_s, "limit_s": round(limit, 1)}
    planned = step.command(ctx, limit)
    if isinstance(planned, Verdict):
        return StepResult(**base, status=planned.status, figure=planned.figure, seconds=0.0)
    if ctx.remaining() < MIN_START_S:
        return StepResult(**base, status=FAIL, figure="no time left before the 8-minute deadline", seconds=0.0,
                          command=planned)
    log.write(f"\n===== {step.name} (limit {limit:.0f} s): {' '.join(planned)}\n".encode())
    rc, output = run_command(planned, limit, log, env if ctx.toy else {**env, **dict(step.env)})  # toy: caller's
    seconds = time.monotonic() - t0
    if rc is None:
        verdict = Verdict(TIMEOUT, f"killed after {limit:.0f} s")
    else:
        try:
            verdict = step.judge(ctx, rc, output)
        except Exception as exc:  # an unexpected output format is this step's failure, not the check's end
            verdict = Verdict(FAIL, f"exit {rc}; judge failed: {type(exc).__name__}: {exc}")
    log.write(f"----- {step.name}: {verdict.status}, {verdict.figure} ({seconds:.1f} s, exit {rc})\n".encode())
    if verdict.status in FAILED:
        tail = "\n".join(output.replace("\r", "\n").strip().splitlines()[-15:])
        print(f"   {step.name} output (last lines):\n" + "\n".join(f"   | {x}" for x in tail.splitlines()), flush=True)
    return StepResult(**base, status=verdict.status, figure=verdict.figure, seconds=round(seconds, 1), rc=rc,
                      command=planned, rows=verdict.rows, details=verdict.details)


def run_all(steps: tuple[Step, ...], ctx: Context, log: IO[bytes], env: dict[str, str]) -> list[StepResult]:
    results = []
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.name} (budget {step.budget_s} s, {ctx.remaining():.0f} s left) ...",
              flush=True)
        result = run_step(step, ctx, log, env)
        print(f"   {result.status}: {result.figure} ({result.seconds:.1f} s)", flush=True)
        results.append(result)
    return results


# ---- reporting ---------------------------------------------------------------------------------------------------


def exit_code(results: list[StepResult]) -> int:
    """1 when any step failed or timed out; skipped steps and toy runs without a verdict do not fail the check."""
    return int(any(r.status in FAILED for r in results))


def format_table(results: list[StepResult]) -> str:
    """One markdown table (step | status | key figure | seconds), cases indented under their step."""
    lines = ["| step | status | key figure | seconds |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.figure} | {r.seconds:.1f} |")
        for row in r.rows:
            secs = "" if row.seconds is None else f"{row.seconds:.1f}"
            lines.append(f"| &nbsp;&nbsp;{row.step} | {row.status} | {row.figure} | {secs} |")
    return "\n".join(lines)


def summary(results: list[StepResult], machine: dict[str, Any], ctx: Context, seconds: float) -> dict[str, Any]:
    """gpu_check.json's content."""
    return {
        "ok": exit_code(results) == 0, "exit_code": exit_code(results),
        "mode": "dry run (toy sizes on the CPU)" if ctx.toy else f"{ctx.device}", "machine": machine,
        "seconds": round(seconds, 1), "total_budget_s": TOTAL_S,
        "budgets_s": {s.name: s.budget_s for s in STEPS}, "steps": [dataclasses.asdict(r) for r in results],
        "table": format_table(results),
    }


MACHINE_PY = """
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
try:
    import timm
    info["timm"] = timm.__version__
except ImportError as exc:
    info["timm"] = f"missing ({exc})"
if info["gpus"]:
    p = torch.cuda.get_device_properties(0)
    info["gpu_name"], info["gpu_memory_gib"] = p.name, round(p.total_memory / 2**30, 1)
print(json.dumps(info))
"""


def machine_info(python: str) -> dict[str, Any]:
    """GPU, driver, torch and the date, read in a subprocess so this driver never holds a CUDA context."""
    info: dict[str, Any] = {"date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                            "host": platform.node(), "cpus": os.cpu_count()}
    try:
        done = subprocess.run([python, "-c", MACHINE_PY], capture_output=True, text=True, timeout=60, cwd=ROOT)
        info |= json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
            "torch_error": done.stderr.strip()[-500:]}
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as exc:
        info["torch_error"] = repr(exc)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
        first = [x.strip() for x in (info["nvidia_smi"] or [""])[0].split(",")]
        info["driver"] = first[2] if len(first) == 3 else None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    info["git_commit"] = git.stdout.strip() if git.returncode == 0 else None
    return info


def child_env(toy: bool) -> dict[str, str]:
    """Unbuffered output, no display, sparse progress bars (the log comes back over a size limit)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "TQDM_MININTERVAL": "10"}
    if toy:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="results folder (comes back)")
    p.add_argument("--work", default=None, help="scratch data (default: /tmp/gpu_check_work, or ..._dry)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu implies --dry-run")
    p.add_argument("--dry-run", action="store_true", help="every step at toy size on the CPU")
    p.add_argument("--started_at", type=float, default=None,
                   help="epoch seconds the whole check started (gpu_check.sh passes it, so the install counts)")
    p.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], default=None, help="only these steps")
    opts = p.parse_args(argv)
    toy = opts.dry_run or opts.device == "cpu"
    device = "cpu" if toy else "cuda"
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(opts.work or ("/tmp/gpu_check_work_dry" if toy else "/tmp/gpu_check_work")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = opts.started_at if opts.started_at is not None else time.time()
    t0 = time.monotonic()
    deadline = t0 - (time.time() - started) + TOTAL_S - FINISH_S
    machine = machine_info(sys.executable)
    print("machine: " + json.dumps(machine), flush=True)
    ctx = Context(out=out, work=work, device=device, toy=toy, gpus=int(machine.get("gpus") or 0),
                  python=sys.executable, deadline=deadline)
    steps = tuple(s for s in STEPS if opts.steps is None or s.name in opts.steps)
    with open(out / "gpu_check.log", "wb", buffering=0) as log:  # unbuffered: the steps write to its descriptor
        log.write(f"gpu_check {'dry run' if toy else device}: {json.dumps(machine)}\n".encode())
        results = run_all(steps, ctx, log, child_env(toy))
    report = summary(results, machine, ctx, time.monotonic() - t0)
    write_json_atomic(out / "gpu_check.json", report)
    name = machine.get("gpu_name") or f"CPU x{machine.get('cpus')}"
    print(f"\ngpu_check on {name} (torch {machine.get('torch')}, driver {machine.get('driver')}, "
          f"{machine['date_utc']}), {report['mode']}: {report['seconds']:.0f} s, "
          f"{'all passed' if report['ok'] else 'FAILED'}\n{report['table']}\n-> {out / 'gpu_check.json'}", flush=True)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
