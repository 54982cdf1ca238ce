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
