"""The evaluation's one config: built by evaluate.py from its flags or directly from Python, validated only here.

Errors name the evaluate.py flag of the bad value, since that is how most users set it; from Python the flag maps to
the field of the same name with underscores (``--null-size`` is ``null_size``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

from data.metadata import column_pairs
from utils.errors import ConfigError
from utils.evaluation.metrics.batch import BATCH_CLASSIFIERS

NSP_MODES = ("perturbation", "well_position")
DEFAULT_CONTROLS: tuple[str, ...] = ("DMSO",)  # may be absent from a table whose control_type marks negcon wells
METADATA_PRESETS: dict[str, dict[str, str]] = {
    "none": {},
    "pycytominer": {
        "Metadata_broad_sample": "perturbation_id",
        "Metadata_Plate": "plate",
        "Metadata_Well": "well",
        "Metadata_Batch": "batch",
        "Metadata_moa": "target",
        "Metadata_gene_group": "gene_group",
        "Metadata_control_type": "control_type",
    },
}


def _names(value: str | Iterable[str]) -> tuple[str, ...]:
    """A tuple of names; one bare string is one name (not its characters)."""
    return (value,) if isinstance(value, str) else tuple(value)


def _column_map(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """SOURCE -> DEST from a mapping or from --map pairs, checked by the site tables' rule (``data.metadata``)."""
    return dict(column_pairs(value))


def _positive_int(value: object, flag: str) -> None:
    """Reject anything but an integer >= 1, naming the flag."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ConfigError(f"{flag} {value!r} must be a positive integer")


def _choice(value: object, choices: Iterable[str], flag: str) -> None:
    """Reject a value outside ``choices``, naming the flag and the choices."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"unknown {flag} {value!r}: choose from {', '.join(choices)}")


@dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run needs; evaluate.py builds it from its flags, a notebook builds it directly.

    Frozen, so nothing below ``run_evaluation`` can change a setting halfway through a run. Sequences are stored as
    tuples and ``column_map`` as a dict (it also takes evaluate.py's list of ``--map`` pairs).
    """

    input_dir: Path
    out_dir: Path
    orf: bool = False
    seed: int = 507
    nsp_mode: str = "perturbation"
    null_size: int = 10000
    replicate_null_size: int = 1000
    threshold: float = 0.05
    controls: tuple[str, ...] = DEFAULT_CONTROLS
    column_map: Mapping[str, str] | Sequence[tuple[str, str]] = field(default_factory=dict)  # a dict once built
    metadata_preset: str = "none"
    replicate_diffby: tuple[str, ...] = ()
    batch_classifier: str = "ridge"
    device: str | None = None
    progress: bool = True
    figures: bool = True
    compare_to: tuple[str, ...] = ()
    sampled_p_values: bool = False
    allow_different_wells: bool = False  # score each representation on its own wells (not comparable; warned)

    def __post_init__(self) -> None:
        """Normalise the types, then check every value, so a bad setting fails before any file is read."""
        for name, value in (
            ("input_dir", Path(self.input_dir)),
            ("out_dir", Path(self.out_dir)),
            ("controls", _names(self.controls)),
            ("column_map", _column_map(self.column_map)),
            ("replicate_diffby", _names(self.replicate_diffby)),
            ("compare_to", _names(self.compare_to)),
        ):
            object.__setattr__(self, name, value)
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral) or self.seed < 0:
            raise ConfigError(f"--seed {self.seed!r} must be a non-negative integer")
        _choice(self.nsp_mode, NSP_MODES, "--nsp-mode")
        _positive_int(self.null_size, "--null-size")
        _positive_int(self.replicate_null_size, "--replicate-null-size")
        if not isinstance(self.threshold, Real) or not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"--threshold {self.threshold} must be a significance level between 0 and 1")
        _choice(self.metadata_preset, METADATA_PRESETS, "--metadata-preset")
        _choice(self.batch_classifier, BATCH_CLASSIFIERS, "--batch-classifier")

    @property
    def label(self) -> str:
        """The target-level label column: gene_group for ORF sets, as in the paper."""
        return "gene_group" if self.orf else "target"


def default_device() -> str | None:
    """CUDA when an NVIDIA driver is loaded and torch sees the GPU; None means numpy (torch is not even imported)."""
    if not Path("/proc/driver/nvidia").exists():
        return None
    try:
        # lazy: torch costs about a second to import, and without an NVIDIA driver it is never needed
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None
