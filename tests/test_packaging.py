"""The project's own files must declare what it needs, identically for pip and conda users."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirement_lines(text: str) -> set[str]:
    lines = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("- "):
            line = line[2:].strip()
        if line and re.match(r"^[A-Za-z0-9_.\-]+\s*[<>=!~]", line):
            lines.add(line.replace(" ", ""))
    return lines


def test_requirements_and_environment_list_the_same_packages() -> None:
    reqs = _requirement_lines((ROOT / "requirements.txt").read_text())
    env_text = (ROOT / "environment.yml").read_text()
    pip_section = env_text.split("- pip:", 1)[1]
    env = _requirement_lines(pip_section)
    assert reqs, "requirements.txt lists nothing"
    assert reqs == env


def test_torch_is_pinned_to_a_range_not_a_wheel_url() -> None:
    text = (ROOT / "requirements.txt").read_text()
    assert "download.pytorch.org" not in text
    torch_line = next(line for line in text.splitlines() if line.startswith("torch"))
    assert "<=" in torch_line and ">=" in torch_line


def test_ci_calls_make_test() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    assert "make demo" in head and "make test" in head


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    import os

    from utils.fileio import write_text_atomic

    target = tmp_path / "out.txt"
    write_text_atomic(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.read_text() == "x"
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# What the GPU machine's image already holds (docs of the device tool, 2026-11-17), as far as the wheels' needs go.
GPU_IMAGE_HAS = {"numpy", "pandas", "scipy", "scikit-learn", "scikit-image", "pyarrow", "pyyaml", "packaging",
                 "regex", "typing-extensions", "tqdm", "statsmodels", "pillow", "formulaic", "patsy", "torch", "timm",
                 "tifffile", "matplotlib", "tensorboard", "threadpoolctl", "greenlet"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_gpu_wheels_pin_requirements_and_close_over_their_dependencies() -> None:
    """bench/gpu_wheels.txt (make gpu-wheels): every pin satisfies requirements.txt, the four packages the GPU image
    lacks are there, and each pinned package's own runtime needs are pinned too or already on the image, so the
    ``pip install --no-deps`` of bench/gpu_check.sh cannot leave an import failing."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    pins = {}
    for raw in (ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_canonical(name)] = version
    assert {"pycytominer", "copairs", "cp-measure", "harmonypy"} <= set(pins)
    ranges = {}
    for line in _requirement_lines((ROOT / "requirements.txt").read_text()):
        req = Requirement(line)
        ranges[_canonical(req.name)] = req.specifier
    for name, version in pins.items():
        if name in ranges:
            assert ranges[name].contains(version), f"{name}=={version} is outside requirements.txt {ranges[name]}"
    missing = []
    for name in pins:
        try:
            needs = requires(name) or []
        except PackageNotFoundError:  # not installed here: its needs cannot be read, the pin is taken as given
            continue
        for text in needs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                continue
            dep = _canonical(req.name)
            if dep not in pins and dep not in GPU_IMAGE_HAS:
                missing.append(f"{name} needs {dep}")
    assert missing == []
