"""Intensity normalisation: numerics against a per-channel NumPy loop, presets, JSON round trip and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.intensity import PRESETS, IntensityNorm, get_intensity_norm, uint16_to_float
from data.schema import DEFAULT_CHANNELS
from utils.errors import DataError


def reference_standardize(x01: np.ndarray, mean, std) -> np.ndarray:
    """Brute force: loop over every channel at dim -3."""
    out = np.empty_like(x01, dtype=np.float64)
    for c in range(x01.shape[-3]):
        out[..., c, :, :] = (x01[..., c, :, :].astype(np.float64) - mean[c]) / std[c]
    return out


@pytest.fixture
def raw() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 65536, size=(2, 3, 5, 6, 7), dtype=np.uint16)


def test_uint16_to_float_for_every_input_dtype(raw):
    expected = raw.astype(np.float64) / 65535.0
    for tensor in (torch.from_numpy(raw.astype(np.int32)), torch.from_numpy(raw.astype(np.float64)),
                   torch.from_numpy(raw.astype(np.int32)).to(torch.uint16)):
        out = uint16_to_float(tensor)
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    extremes = uint16_to_float(torch.tensor([0, 65535], dtype=torch.int32))
    assert extremes.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("shape", [(5, 6, 7), (3, 5, 6, 7), (2, 3, 5, 6, 7)])
def test_standardize_and_apply_match_reference_on_all_ranks(raw, shape):
    norm = PRESETS["paper_train"]
    x = raw.reshape(-1)[: int(np.prod(shape))].reshape(shape)
    expected = reference_standardize(x / 65535.0, norm.mean, norm.std)
    x01 = torch.from_numpy(x.astype(np.float32) / 65535.0)
    before = x01.clone()
    np.testing.assert_allclose(norm.standardize(x01).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(x01, before)
    applied = norm.apply(torch.from_numpy(x.astype(np.int32)).to(torch.uint16))
    assert applied.dtype == torch.float32
    np.testing.assert_allclose(applied.numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(applied, norm.standardize(uint16_to_float(torch.from_numpy(x.astype(np.int32)))))


def test_wrong_channel_count_is_a_clear_error():
    norm = PRESETS["paper_multisource"]
    with pytest.raises(DataError, match="paper_multisource' has 5 channels .* has 3 at dim -3"):
        norm.apply(torch.zeros(2, 3, 4, 4))
    with pytest.raises(DataError, match="dim -3"):
        norm.standardize(torch.zeros(4, 4))


def test_presets_are_the_paper_sets_and_train_differs_from_inference():
    assert set(PRESETS) == {"paper_train", "paper_multisource", "paper_default"}
    for name, norm in PRESETS.items():
        assert norm.name == name and norm.channels == DEFAULT_CHANNELS and norm.scale == 65535.0
        assert len(norm.mean) == len(norm.std) == 5
    assert PRESETS["paper_train"].mean[0] == pytest.approx(0.13849893)
    assert PRESETS["paper_multisource"].std[4] == pytest.approx(0.15773378)
    assert PRESETS["paper_default"].mean[4] == pytest.approx(0.09648295)
    assert PRESETS["paper_train"] != PRESETS["paper_multisource"]


def test_json_round_trip_through_file_and_lookup(tmp_path):
    norm = IntensityNorm(mean=(0.1, 0.2), std=(0.3, 0.4), channels=("DNA", "ER"), name="mine",
                         percentiles={"1": [10.0, 20.0], "99.9": [60000.0, 61000.0]})
    assert IntensityNorm.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    path = tmp_path / "norm.json"
    norm.save(path, source={"csv": "x.csv", "sites": 3})
    assert json.loads(path.read_text())["source"]["sites"] == 3
    assert get_intensity_norm(str(path)) == norm
    assert get_intensity_norm("paper_train") is PRESETS["paper_train"]
    assert [p.name for p in tmp_path.iterdir()] == ["norm.json"]


def test_select_reorders_by_name():
    norm = PRESETS["paper_train"]
    sub = norm.select(["DNA", "Mito"])
    assert sub.channels == ("DNA", "Mito")
    assert sub.mean == (norm.mean[4], norm.mean[0]) and sub.std == (norm.std[4], norm.std[0])
    x = torch.rand(1, 5, 3, 3)
    torch.testing.assert_close(sub.standardize(x[:, [4, 0]]), norm.standardize(x)[:, [4, 0]])
    with pytest.raises(DataError, match="no channels \\['Brightfield'\\]"):
        norm.select(["Brightfield"])


def test_bad_definitions_and_files(tmp_path):
    with pytest.raises(DataError, match="std must be > 0"):
        IntensityNorm(mean=(0.1,), std=(0.0,), channels=("DNA",))
    with pytest.raises(DataError, match="2 means, 1 stds for 2 channels"):
        IntensityNorm(mean=(0.1, 0.2), std=(0.1,), channels=("DNA", "ER"))
    with pytest.raises(DataError, match="unknown keys \\['meen'\\]"):
        IntensityNorm.from_dict({"meen": [0.1], "std": [0.1], "channels": ["DNA"]})
    with pytest.raises(DataError, match="missing keys \\['mean'\\]"):
        IntensityNorm.from_dict({"std": [0.1], "channels": ["DNA"]})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        get_intensity_norm(str(tmp_path / "bad.json"))
    with pytest.raises(DataError, match="unknown intensity normalisation 'imagenet'"):
        get_intensity_norm("imagenet")
