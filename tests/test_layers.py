"""The layer rules of docs/ARCHITECTURE.md, checked on the source with ``ast`` (no import, so it cannot be fooled by
import side effects): leaf utils import nothing above them, data/models import only leaf utils, and the pipelines
use each other only along the documented direction. Function-level imports must say why they are lazy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "data", "models", "supervised_baseline")
SCRIPTS = ("inference.py", "evaluate.py", "train_dino.py", "train_mae.py", "train_simclr.py")

LEAF = {"utils.errors", "utils.cli", "utils.fileio", "utils.seeding", "utils.logging", "utils.distributed",
        "utils.precision", "utils.rundir", "utils.resources"}
PIPELINES = ("utils.profiles", "utils.inference", "utils.evaluation", "utils.handcrafted", "utils.training")
# Which other pipelines each pipeline may import (docs/ARCHITECTURE.md, "Layers"): profiles is the shared base,
# the training probe uses inference and evaluation; nothing imports training, and nothing the other way.
PIPELINE_USES: dict[str, set[str]] = {
    "utils.profiles": set(),
    "utils.inference": {"utils.profiles"},
    "utils.evaluation": {"utils.profiles"},
    "utils.handcrafted": {"utils.profiles"},
    "utils.training": {"utils.profiles", "utils.inference", "utils.evaluation"},
}
LAZY_REASONS = ("lazy", "cycle")


def _layer(module: str) -> str:
    """The layer a dotted module belongs to: a leaf util, a pipeline package, data, models, or a script."""
    if module in LEAF:
        return "leaf"
    for pipeline in PIPELINES:
        if module == pipeline or module.startswith(pipeline + "."):
            return pipeline
    top = module.split(".")[0]
    if top in ("data", "models", "supervised_baseline"):
        return top
    if module in {s[:-3] for s in SCRIPTS}:
        return "script"
    if top == "utils":
        return "utils-other"  # a utils module that is neither leaf nor in a pipeline: not allowed to exist
    return "external"


def allowed(importer: str, imported: str) -> bool:
    """Whether module ``importer`` may import module ``imported`` under the documented layer rules."""
    src, dst = _layer(importer), _layer(imported)
    if dst == "external" or src == dst:
        return True
    if dst in ("utils-other", "script"):
        return False  # nothing below the scripts imports a script
    if src == "leaf":
        return False  # leaf modules of one layer import each other only (src == dst above)
    if src in ("data", "models"):
        return dst == "leaf" or (src == "models" and dst == "data")
    if src == "supervised_baseline":
        return dst in ("leaf", "data", "models", "utils.profiles", "utils.evaluation")
    if src in PIPELINE_USES:
        return dst in ("leaf", "data", "models") or dst in PIPELINE_USES[src]
    return src == "script"


def _module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level?) for every import; ``from pkg import name`` counts as
    ``pkg.name`` when that names a submodule, else as ``pkg``; TYPE_CHECKING blocks are skipped."""
    tree = ast.parse(source)
    out: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.extend((child.lineno, alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(child, module, is_package)
                for alias in child.names:
                    candidate = f"{target}.{alias.name}"
                    is_sub = (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
                        ROOT / Path(*candidate.split(".")) / "__init__.py").is_file()
                    out.append((child.lineno, candidate if is_sub else target, top))
            else:
                nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                visit(child, top and not nested)

    visit(tree, True)
    return out


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return sorted(files + [ROOT / s for s in SCRIPTS])


def violations(files: list[Path]) -> list[str]:
    """Every import that breaks the layer rules, as 'file:line importer -> imported'."""
    bad = []
    for path in files:
        module = _module_name(path)
        for line, imported, _ in imports_of(path.read_text(), module, path.name == "__init__.py"):
            if not allowed(module, imported):
                bad.append(f"{path.relative_to(ROOT)}:{line} {module} -> {imported}")
    return bad


def unexplained_lazy_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Function-level imports without a comment (on the line or the three above) naming why they are lazy."""
    lines = path.read_text().splitlines()
    bad = []
    for line, imported, top in imports_of(path.read_text(), _module_name(path, root), path.name == "__init__.py"):
        context = " ".join(lines[max(0, line - 4): line]).lower()
        if not top and not any(reason in context for reason in LAZY_REASONS):
            bad.append(f"{path.relative_to(root)}:{line} {imported}")
    return bad


def test_every_import_follows_the_layer_rules() -> None:
    assert violations(_sources()) == []


def test_function_level_imports_say_why() -> None:
    bad = [entry for path in _sources() for entry in unexplained_lazy_imports(path)]
    assert bad == []


def test_utils_holds_only_the_leaf_layer_and_the_pipeline_packages() -> None:
    modules = {p.stem for p in (ROOT / "utils").glob("*.py")} - {"__init__"}
    packages = {p.name for p in (ROOT / "utils").iterdir() if (p / "__init__.py").is_file()}
    assert {f"utils.{m}" for m in modules} == LEAF
    assert {f"utils.{p}" for p in packages} == set(PIPELINES)


@pytest.mark.parametrize(
    ("importer", "source", "bad"),
    [
        ("data.tiling", "from utils.training import train\n", True),
        ("models.dino", "import utils.inference.pipeline\n", True),
        ("models.dino", "from utils import profiles\n", True),
        ("utils.inference.plates", "from utils.training.probe import Probe\n", True),
        ("utils.evaluation.pipeline", "from utils.inference import run_inference\n", True),
        ("utils.errors", "from data.schema import DEFAULT_CHANNELS\n", True),
        ("utils.profiles.normalize", "from utils.evaluation import EvalConfig\n", True),
        ("utils.training.probe", "import inference\n", True),
        ("utils.training.probe", "from utils.inference import embed_profiles\n", False),
        ("utils.handcrafted.profiles", "from utils.profiles import normalize_profiles\n", False),
        ("data.io", "from utils.errors import DataError\n", False),
        ("models.checkpoints", "from data.intensity import IntensityNorm\n", False),
    ],
)
def test_the_checker_catches_a_wrong_import(importer: str, source: str, bad: bool) -> None:
    """The rule applied to scratch sources: a wrong direction is reported, an allowed one is not."""
    found = [imported for _, imported, _ in imports_of(source, importer) if not allowed(importer, imported)]
    assert bool(found) == bad, found


def test_an_unexplained_lazy_import_is_reported(tmp_path: Path) -> None:
    scratch = tmp_path / "data" / "scratch.py"
    scratch.parent.mkdir()
    scratch.write_text("def f():\n    import json\n    return json\n\n\ndef g():\n"
                       "    import csv  # lazy: costs nothing, but says why\n    return csv\n")
    assert unexplained_lazy_imports(scratch, tmp_path) == ["data/scratch.py:2 json"]
