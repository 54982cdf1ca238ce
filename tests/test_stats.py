"""Dataset statistics: exact histogram maths against NumPy on raw pixels, sampling, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data.intensity import get_intensity_norm
from data.io import write_merged_tiff
from data.stats import DEFAULT_PERCENTILES, compute_intensity_norm, histogram_percentiles, main, sample_sites
from utils.cli import run_cli
from utils.errors import DataError

CHANNELS = ("Mito", "AGP", "RNA", "ER", "DNA")


def random_sites(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sites = []
    for i in range(n):
        site = rng.gamma(2.0, 800.0 * (1 + np.arange(5))[:, None, None], size=(5, 9 + i, 11))
        site[:, 0, 0] = 65535  # saturated pixel, as real data have
        sites.append(np.clip(site, 0, 65535).astype(np.uint16))
    return sites


def test_statistics_match_numpy_on_all_pixels():
    sites = random_sites(4)
    norm = compute_intensity_norm(sites, CHANNELS, name="toy")
    pooled = np.concatenate([s.reshape(5, -1) for s in sites], axis=1).astype(np.float64) / 65535.0
    np.testing.assert_allclose(norm.mean, pooled.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(norm.std, pooled.std(axis=1), rtol=1e-9)
    for p in DEFAULT_PERCENTILES:
        np.testing.assert_allclose(norm.percentiles[f"{p:g}"], np.percentile(pooled, p, axis=1), rtol=1e-12)
    assert set(norm.percentiles) == {"0.1", "1", "50", "99", "99.9"}
    assert norm.channels == CHANNELS and norm.name == "toy"


def test_histogram_percentiles_interpolate_like_numpy():
    values = np.array([3, 3, 10, 200, 65535, 7], dtype=np.uint16)
    hist = np.bincount(values, minlength=65536)[None]
    for p in (0, 0.1, 13.7, 50, 99.9, 100):
        assert histogram_percentiles(hist, [p])[0, 0] == pytest.approx(np.percentile(values.astype(float), p))


def test_constant_channel_and_wrong_channel_count_are_errors():
    site = random_sites(1)[0]
    site[2] = 7
    with pytest.raises(DataError, match="\\['RNA'\\] are constant"):
        compute_intensity_norm([site], CHANNELS)
    with pytest.raises(DataError, match="5 channels, expected 2"):
        compute_intensity_norm([site], ("DNA", "ER"))
    with pytest.raises(DataError, match="no pixels"):
        compute_intensity_norm([], CHANNELS)


def test_sampling_is_seeded_sorted_and_without_replacement():
    a = sample_sites(100, 10, seed=3)
    assert np.array_equal(a, sample_sites(100, 10, seed=3))
    assert not np.array_equal(a, sample_sites(100, 10, seed=4))
    assert len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
    assert np.array_equal(sample_sites(5, 10, seed=0), np.arange(5))


def make_dataset(tmp_path, sites: list[np.ndarray]) -> str:
    rows = []
    for i, site in enumerate(sites):
        write_merged_tiff(tmp_path / f"s{i}.tif", site, otsu=None)
        rows.append({"FileName_Merged": f"s{i}.tif", "plate": "P", "well": f"A{i:02d}", "field": 1})
    pd.DataFrame(rows).to_csv(tmp_path / "dataset.csv", index=False)
    return str(tmp_path / "dataset.csv")


def test_cli_writes_a_loadable_norm_from_the_sampled_sites(tmp_path, capsys):
    sites = random_sites(5)
    csv = make_dataset(tmp_path, sites)
    out = tmp_path / "out" / "stats.json"
    assert main([csv, "-o", str(out), "--sites", "3", "--seed", "1", "--workers", "1"]) == 0
    norm = get_intensity_norm(str(out))
    chosen = sample_sites(5, 3, seed=1)
    assert norm.to_dict()["mean"] == compute_intensity_norm([sites[i] for i in chosen], CHANNELS).to_dict()["mean"]
    source = json.loads(out.read_text())["source"]
    assert source["sites"] == 3 and source["total_sites"] == 5 and source["seed"] == 1
    assert norm.name == "dataset"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stats: 3/5 sites")


def test_cli_channel_subset_in_declared_order(tmp_path):
    sites = random_sites(2)
    csv = make_dataset(tmp_path, sites)
    main([csv, "-o", str(tmp_path / "s.json"), "--channels", "DNA", "Mito", "--sites", "0", "--workers", "1"])
    norm = get_intensity_norm(str(tmp_path / "s.json"))
    expected = compute_intensity_norm([s[[4, 0]] for s in sites], ("DNA", "Mito"))
    assert norm.channels == ("DNA", "Mito") and norm.mean == expected.mean


def test_cli_reports_bad_csv_as_one_line(tmp_path, capsys):
    pd.DataFrame([{"FileName_Merged": "missing.tif"}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([str(tmp_path / "bad.csv"), "-o", str(tmp_path / "s.json")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.tif" in err and "\n" not in err
    assert not (tmp_path / "s.json").exists()
