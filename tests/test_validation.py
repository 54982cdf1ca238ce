"""Validation: grouped split, the paper's contrastive rank metrics (vs brute force), and no effect on training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from utils.errors import ConfigError
from utils.training import parse_config, train
from utils.training.args import VAL_GROUPS, parse_args
from utils.training.validation import GROUP_COLUMNS, contrastive_metrics, positive_ranks, rank_metrics, split_sites

ROOT = Path(__file__).resolve().parents[1]


def _ranks_by_loop(sim: torch.Tensor, pos_idx: list[int], self_idx: list[int]) -> list[int]:
    ranks = []
    for i in range(sim.shape[0]):
        ranks.append(sum(1 for j in range(sim.shape[1])
                         if j not in (self_idx[i], pos_idx[i]) and sim[i, j] > sim[i, pos_idx[i]]))
    return ranks


def test_positive_ranks_match_a_loop_with_ties():
    gen = torch.Generator().manual_seed(0)
    sim = torch.randint(-3, 4, (10, 16), generator=gen).float()  # many ties: they count for the positive
    pos = torch.randint(0, 16, (10,), generator=gen)
    self_idx = (pos + 1 + torch.randint(0, 15, (10,), generator=gen)) % 16
    sim[torch.arange(10), self_idx] = 100.0  # self must never count as a competitor
    got = positive_ranks(sim, pos, self_idx)
    assert got.tolist() == _ranks_by_loop(sim, pos.tolist(), self_idx.tolist())


def _paper_metrics(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, float]:
    """The paper's formulation: argsort of [positive, masked similarities] and the position of column 0."""
    feats = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    cos = feats @ feats.T
    n2 = cos.shape[0]
    eye = torch.eye(n2, dtype=torch.bool)
    cos = cos.masked_fill(eye, -9e15)
    pos_mask = eye.roll(shifts=n2 // 2, dims=0)
    comb = torch.cat([cos[pos_mask][:, None], cos.masked_fill(pos_mask, -9e15)], dim=-1)
    position = comb.argsort(dim=-1, descending=True).argmin(dim=-1).float()
    return {"acc_top1": (position == 0).float().mean().item(), "acc_top5": (position < 5).float().mean().item(),
            "acc_mean_pos": 1 + position.mean().item()}


def test_contrastive_metrics_equal_the_papers_definition():
    gen = torch.Generator().manual_seed(1)
    z1 = torch.randn(12, 8, generator=gen)
    z2 = z1 + 0.8 * torch.randn(12, 8, generator=gen)  # some positives win, some lose
    got = {k: v.item() for k, v in contrastive_metrics(torch.cat([z1, z2])).items()}
    want = _paper_metrics(z1, z2)
    assert got == pytest.approx(want)
    assert 0 < want["acc_top1"] < 1 and want["acc_mean_pos"] > 1


def test_rank_metrics_definition():
    out = rank_metrics(torch.tensor([0, 0, 4, 5, 11]))
    assert out["acc_top1"].item() == pytest.approx(2 / 5)
    assert out["acc_top5"].item() == pytest.approx(3 / 5)
    assert out["acc_mean_pos"].item() == pytest.approx(1 + 20 / 5)


def _metrics_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(3))  # (views, global N, dim)
    local = z[:, rank * 4:(rank + 1) * 4].reshape(8, 6)  # this rank's 4 samples, view-major
    got = contrastive_metrics(local)
    torch.save({k: v.item() for k, v in got.items()}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_gathered_metrics_averaged_over_ranks_equal_the_single_process_metrics(tmp_path):
    mp.spawn(_metrics_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    z = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(3))
    want = {k: v.item() for k, v in contrastive_metrics(z.reshape(16, 6)).items()}
    assert {k: (parts[0][k] + parts[1][k]) / 2 for k in want} == pytest.approx(want)


def _table(plates: int = 3, wells: int = 8, sites: int = 3) -> pd.DataFrame:
    rows = [{"plate": f"P{p}", "well": f"W{w:02}", "field": s} for p in range(plates) for w in range(wells)
            for s in range(sites)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("group", ["well", "plate"])
def test_split_is_grouped_seeded_and_independent_of_row_order(group):
    table = _table()
    split = split_sites(table, 0.25, group, seed=7)
    cols = list(GROUP_COLUMNS[group])
    train_keys = set(map(tuple, table.iloc[split.train][cols].to_numpy()))
    val_keys = set(map(tuple, table.iloc[split.val][cols].to_numpy()))
    assert train_keys and val_keys and not train_keys & val_keys
    assert sorted([*split.train, *split.val]) == list(range(len(table)))
    assert split.summary["val_sites"] == len(split.val)
    if group == "well":
        assert len(split.val) == 18  # 6 of 24 wells, exactly 25 %
    shuffled = table.sample(frac=1.0, random_state=0).reset_index(drop=True)
    again = split_sites(shuffled, 0.25, group, seed=7)
    assert again.summary["val_group_keys"] == split.summary["val_group_keys"]
    other = split_sites(table, 0.25, group, seed=8)
    if group == "well":
        assert other.summary["val_group_keys"] != split.summary["val_group_keys"]


def test_split_errors_name_the_fix():
    with pytest.raises(ConfigError, match="needs column"):
        split_sites(_table().drop(columns=["well"]), 0.2, "well", 0)
    with pytest.raises(ConfigError, match="single plate"):
        split_sites(_table(plates=1), 0.2, "plate", 0)
    assert set(VAL_GROUPS) == set(GROUP_COLUMNS)
    with pytest.raises(ConfigError, match="val_fraction"):
        parse_config("simclr", ["--ckpt_path", "x", "--val_fraction", "1"])
    assert parse_args("simclr", ["--ckpt_path", "x"]).val_fraction == 0.2
    assert parse_args("dino", []).val_fraction == 0.0


@pytest.fixture(scope="module")
def plate(make_plate) -> Path:
    """One tiny synthetic plate of 5 wells (10 sites of 64 px)."""
    return make_plate(5)


TINY = {
    "dino": ["--arch", "vit_debug_patch8", "--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16",
             "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
             "--batch_size_per_gpu", "2", "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1",
             "--use_fp16", "false", "--saveckp_freq", "1", "--val_fraction", "0.2"],
    "mae": ["--model", "vit_debug_patch8", "--input_size", "32", "--batch_size", "2", "--mask_ratio", "0.5",
            "--warmup_epochs", "1", "--saveckp_freq", "1", "--val_fraction", "0.2"],
    "simclr": ["--arch", "vit_debug_patch8", "--size", "32", "--batch_size", "4", "--hidden_dim", "16",
               "--warmup_epochs", "1", "--every_n_epochs", "1"],
}


def _run(method: str, plate: Path, out: Path, *extra: str) -> list[dict]:
    out_flag, epochs_flag = ("--ckpt_path", "--max_epochs") if method == "simclr" else ("--output_dir", "--epochs")
    argv = [*TINY[method], "--path_df", str(plate), out_flag, str(out), epochs_flag, "2", "--num_workers", "0",
            "--max_steps_per_epoch", "2", "--device", "cpu", *extra]
    train(parse_config(method, argv))
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {**{f"b.{k}": v for k, v in ckpt["backbone"].items()}, **{f"h.{k}": v for k, v in ckpt["heads"].items()}}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_validation_leaves_training_untouched_and_is_fixed_across_passes(method, plate, tmp_path):
    every = _run(method, plate, tmp_path / "every", "--val_every", "1")
    last_only = _run(method, plate, tmp_path / "last", "--val_every", "100")
    _assert_equal(_weights(tmp_path / "every" / "checkpoint.pth"), _weights(tmp_path / "last" / "checkpoint.pth"))
    assert "val_loss" in every[0] and "val_loss" not in last_only[0]
    val_keys = [k for k in every[1] if k.startswith("val_")]
    assert {k: every[1][k] for k in val_keys} == {k: last_only[1][k] for k in val_keys}  # same weights, same value
    if method == "simclr":
        assert {"val_loss", "val_acc_top1", "val_acc_top5", "val_acc_mean_pos"} == set(val_keys)
        assert {"train_acc_top1", "train_acc_top5", "train_acc_mean_pos"} <= set(every[0])
    split = json.loads((tmp_path / "every" / "val_split.json").read_text())
    assert split["val_sites"] == 2 and split["train_sites"] == 8  # one well of five held out
    hp = json.loads((tmp_path / "every" / "hp.json").read_text())
    assert hp["validation"]["val_groups"] == 1


@pytest.mark.parametrize("method", ["simclr", "mae"])
def test_kill_and_resume_with_validation_reaches_the_same_weights_and_metrics(method, plate, tmp_path):
    straight = _run(method, plate, tmp_path / "straight")
    numbered = "checkpoint0001.pth" if method == "simclr" else "checkpoint-0001.pth"
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / numbered, tmp_path / "resumed" / "checkpoint.pth")
    resumed = _run(method, plate, tmp_path / "resumed")
    _assert_equal(_weights(tmp_path / "straight" / "checkpoint.pth"),
                  _weights(tmp_path / "resumed" / "checkpoint.pth"))
    assert [r["epoch"] for r in resumed] == [1]
    for key in ("train_loss", "val_loss"):
        assert resumed[0][key] == straight[1][key]
    assert np.isfinite(straight[1]["val_loss"])


def test_plate_grouping_on_a_single_plate_is_a_clear_error(plate, tmp_path):
    with pytest.raises(ConfigError, match="single plate"):
        _run("simclr", plate, tmp_path / "x", "--val_group", "plate")
