"""Launcher detection and the gradient-carrying all-gather, checked in a real 2-process gloo group."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils import distributed
from utils.errors import ConfigError

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "MASTER_ADDR")


@pytest.fixture
def clean_env(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_launcher(clean_env):
    assert distributed.detect_launcher() == ("single", 0, 1, 0)
    info = distributed.init_distributed(device="cpu")
    assert (info.world_size, info.is_main, info.device.type, info.distributed) == (1, True, "cpu", False)


def test_torchrun_env_and_launch_flag(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    assert distributed.detect_launcher() == ("torchrun", 3, 4, 0)
    assert distributed.detect_launcher(local_rank_flag=1) == ("torchrun", 3, 4, 1)
    clean_env.setenv("LOCAL_RANK", "2")
    assert distributed.detect_launcher(local_rank_flag=1) == ("torchrun", 3, 4, 2)


def test_slurm_env(clean_env):
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_LOCALID", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        distributed.detect_launcher()
    clean_env.setenv("MASTER_ADDR", "node01")
    assert distributed.detect_launcher() == ("slurm", 5, 8, 1)
    clean_env.setenv("SLURM_NTASKS", "1")
    assert distributed.detect_launcher()[0] == "single"


def test_cuda_request_without_cuda_is_a_clear_error(clean_env):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="--device cpu"):
        distributed.resolve_device("cuda", 0)


def _gather_worker(rank: int, port: int, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    info = distributed.init_distributed(device="cpu")
    try:
        torch.manual_seed(0)
        full = torch.randn(4, 3)
        weights = torch.randn(2, 4, 3)
        x = full[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
        gathered = distributed.all_gather_with_grad(x)
        (gathered * weights[rank]).pow(2).sum().backward()
        mean = distributed.all_reduce_mean(torch.tensor([float(rank)]))
        # numpy, not tensors: a tensor crosses the queue as a shared-memory fd that dies with this process
        queue.put((rank, info.launcher, gathered.detach().numpy(), x.grad.numpy(), float(mean)))
        distributed.barrier()
    finally:
        distributed.cleanup()


def _two_ranks(target, *args) -> list:
    """Run ``target(rank, port, *args, queue)`` in a real 2-process gloo group; each rank's queued result, sorted."""
    port = distributed.free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_all_gather_with_grad_matches_single_process_gradients():
    results = _two_ranks(_gather_worker)
    torch.manual_seed(0)
    full = torch.randn(4, 3).requires_grad_(True)
    weights = torch.randn(2, 4, 3)
    sum((full * weights[r]).pow(2).sum() for r in range(2)).backward()
    for rank, launcher, gathered, grad, mean in results:
        assert launcher == "torchrun" and mean == pytest.approx(0.5)
        torch.testing.assert_close(torch.from_numpy(gathered), full.detach())
        torch.testing.assert_close(torch.from_numpy(grad), full.grad[2 * rank : 2 * rank + 2])
    assert not dist.is_initialized()


def _lock_worker(rank: int, port: int, folder: str, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    info = distributed.init_distributed(device="cpu")
    try:
        try:
            lock = distributed.claim_output(folder, info)
            queue.put((rank, "held" if lock is not None else "shared", ""))
            if lock is not None:
                lock.release()
        except ConfigError as exc:
            queue.put((rank, "refused", str(exc)))
        distributed.barrier()
    finally:
        distributed.cleanup()


def test_torchrun_ranks_share_rank_zeros_lock_and_its_refusal(tmp_path):
    """Rank 0 alone takes the lock; when another run holds the folder every rank stops with rank 0's message."""
    from utils.rundir import OutputLock

    folder = str(tmp_path / "out")
    assert [r[1] for r in _two_ranks(_lock_worker, folder)] == ["held", "shared"]
    other = OutputLock(folder).acquire()  # this test process, alive, plays the other run
    try:
        results = _two_ranks(_lock_worker, folder)
    finally:
        other.release()
    assert [r[1] for r in results] == ["refused", "refused"]
    assert results[0][2] == results[1][2] and f"in use by pid {os.getpid()}" in results[0][2]
