"""``utils.resources.cap_workers``: worker flags beyond the machine are capped with a warning, and every CLI uses it."""

from __future__ import annotations

import os
import warnings

import pytest

from supervised_baseline.config import TrainingConfig
from utils.handcrafted.config import HandcraftedConfig
from utils.inference.config import READER_THREADS_PER_CPU, InferenceConfig
from utils.resources import available_cpus, cap_workers
from utils.training.config import parse_config


def test_available_cpus_follows_the_affinity_mask() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cpus() == expected >= 1


@pytest.mark.parametrize("requested", [0, 1, 4])
def test_values_within_the_machine_pass_unchanged(requested: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cap_workers("--workers", requested, cpus=4) == requested


def test_a_huge_value_is_capped_with_a_warning_naming_flag_asked_and_used() -> None:
    with pytest.warns(RuntimeWarning, match=r"--workers 100000 exceeds the 4 CPU\(s\) available .*; using 4$"):
        assert cap_workers("--workers", 100000, cpus=4) == 4
    with pytest.warns(RuntimeWarning, match=r"using 12 \(3 per CPU\)"):
        assert cap_workers("--num_workers", 50, per_cpu=3, cpus=4) == 12


def test_a_default_above_a_small_machine_is_capped_silently() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cap_workers("--num_workers", 6, default=6, cpus=1) == 1


def test_configs_cap_their_worker_flags() -> None:
    cpus = available_cpus()
    with pytest.warns(RuntimeWarning, match="--workers 1000000"):
        assert HandcraftedConfig(valset="v", output_dir="o", workers=10**6).workers == cpus
    with pytest.warns(RuntimeWarning, match="--num_workers 1000000"):
        cfg = InferenceConfig(ckpt="<in-memory weights>", outdir="o", num_workers=10**6)
    assert cfg.num_workers == READER_THREADS_PER_CPU * cpus
    with pytest.warns(RuntimeWarning, match=r"training.workers \(--j\) 1000000"):
        assert TrainingConfig(workers=10**6).workers == cpus
    with pytest.warns(RuntimeWarning, match="--num_workers 1000000"):
        train = parse_config("dino", ["--num_workers", str(10**6), "--device", "cpu"])
    assert train.num_workers == cpus and train.flags["num_workers"] == 10**6  # hp.json keeps what was asked
