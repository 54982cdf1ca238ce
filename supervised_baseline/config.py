"""The supervised baseline's one typed config: a JSON file (the paper's hti-cnn configs, in the schema of
supervised_baseline/README.md) plus ``--section.key value`` overrides, validated here and nowhere else.

From Python::

    from supervised_baseline import load_config, train
    train(load_config("supervised_baseline/hti-cnn-master/configs/fnn_dino.json", {"training.epochs": 20}))
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import ConfigError, DataError
from utils.resources import cap_workers


@dataclass(frozen=True)
class DataConfig:
    """Where the well profiles, the compound labels and the optional compound splits are."""

    features: str
    labels: str
    splits: str | None = None
    split: int = 1
    id_column: str | None = None  # the compound column of both tables (default: perturbation_id or an alias)
    label_index: str | None = None  # row ids of a .npy / .mtx label matrix (one per line, or a CSV column)
    label_names: str | None = None  # optional assay names of a .npy / .mtx matrix (one per line)
    n_splits: int = 3  # drawn compound splits when ``splits`` is absent (the paper: three)
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test share of compounds


@dataclass(frozen=True)
class ModelConfig:
    """The paper's FNN: input dropout, ReLU layers with dropout, one logit per assay."""

    name: str = "fnn"
    hidden: tuple[int, ...] = (2048, 2048, 2048)
    dropout: float = 0.5
    input_dropout: float = 0.1


@dataclass(frozen=True)
class TrainingConfig:
    """SGD with momentum, weight decay and gradient-norm clipping, as the paper's configs set them."""

    epochs: int = 100
    batchsize: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad: float = 5.0
    seed: int = 0
    workers: int = 0
    gpus: tuple[int, ...] | None = None  # GPU ids (None: the first GPU when there is one, else the CPU)

    def __post_init__(self) -> None:
        """Cap the loader workers to the CPUs available (a warning names the value), so ``--j 100000`` cannot hang."""
        if isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers > 0:
            object.__setattr__(self, "workers", cap_workers("training.workers (--j)", self.workers))


@dataclass(frozen=True)
class SupervisedConfig:
    """A whole run: name, data, model, training, output folder and (for evaluation) the checkpoint to score."""

    name: str
    data: DataConfig
    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: str | None = None
    comment: str | None = None

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for run records and the checkpoint."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig}


def _type_problem(value: Any, annotation: str) -> str | None:
    """What is wrong with a value's JSON type for its schema annotation (None when it fits).

    Why: a string or a float where the schema wants an integer (``--training.epochs abc``, ``"lr": "0.01"``) would
    otherwise fail later as a TypeError/ValueError traceback instead of one line naming the key.
    """
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    if value is None:
        return None if optional else "must not be null"
    if base.startswith("tuple"):
        inner = "float" if "float" in base else "int"
        if not isinstance(value, tuple) or any(_type_problem(v, inner) for v in value):
            return f"must be a list of {'numbers' if inner == 'float' else 'integers'}"
        return None
    kinds = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string")}
    if base in kinds:
        types, word = kinds[base]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"must be {word}" + (" or null" if optional else "")
    return None


def _check(cfg: SupervisedConfig) -> None:
    """Every value rule of the schema, naming the key."""
    for prefix, obj in (("", cfg), ("data.", cfg.data), ("model.", cfg.model), ("training.", cfg.training)):
        for f in dataclasses.fields(obj):
            problem = _type_problem(getattr(obj, f.name), str(f.type))
            if problem:
                raise ConfigError(f"{prefix}{f.name} {getattr(obj, f.name)!r}: {problem}")
    d, m, t = cfg.data, cfg.model, cfg.training
    if not cfg.name:
        raise ConfigError("name: must not be empty")
    if m.name != "fnn":
        raise ConfigError(f"model.name {m.name!r}: only 'fnn' (the paper's FNN) is implemented")
    if not m.hidden or any(int(h) != h or h < 1 for h in m.hidden):
        raise ConfigError(f"model.hidden {list(m.hidden)}: needs positive integer layer widths")
    for key, value in (("model.dropout", m.dropout), ("model.input_dropout", m.input_dropout)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key} {value}: must be in [0, 1)")
    for key, value in (("training.epochs", t.epochs), ("training.batchsize", t.batchsize), ("data.split", d.split),
                       ("data.n_splits", d.n_splits)):
        if int(value) != value or value < 1:
            raise ConfigError(f"{key} {value!r}: must be a positive integer")
    for key, value in (("training.lr", t.lr), ("training.momentum", t.momentum),
                       ("training.weight_decay", t.weight_decay), ("training.clip_grad", t.clip_grad)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key} {value!r}: must be a finite number >= 0")
    if t.workers < 0:
        raise ConfigError(f"training.workers {t.workers}: must be >= 0")
    if d.splits is None and d.split > d.n_splits:
        raise ConfigError(f"data.split {d.split}: only {d.n_splits} drawn splits (data.n_splits)")
    if len(d.fractions) != 3 or any(f <= 0 for f in d.fractions) or not math.isclose(sum(d.fractions), 1.0):
        raise ConfigError(f"data.fractions {list(d.fractions)}: three positive train/val/test shares summing to 1")


def _coerce(value: Any, annotation: str) -> Any:
    """JSON lists become tuples where the schema has tuples, so configs stay hashable and comparable."""
    if isinstance(value, list) and "tuple" in annotation:
        return tuple(value)
    return value


def _section(cls: type, values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: must be an object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                          f"known: {', '.join(fields)}")
    missing = [k for k, f in fields.items() if k not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(f'{where}.{k}' for k in missing)}")
    try:
        return cls(**{k: _coerce(v, str(fields[k].type)) for k, v in values.items()})
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> SupervisedConfig:
    """Build and validate a config from a parsed JSON object (unknown keys are errors that name them)."""
    top = {f.name for f in dataclasses.fields(SupervisedConfig)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(top))}")
    for key in ("name", "data", "output_dir"):
        if key not in raw:
            raise ConfigError(f"{source}: missing key {key!r}")
    sections = {k: _section(cls, raw.get(k, {}), k) for k, cls in SECTIONS.items()}
    rest = {k: raw[k] for k in ("name", "output_dir", "checkpoint", "comment") if k in raw}
    return SupervisedConfig(**rest, **sections)


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``a.b`` (creating sections), as the paper's ``--a.b value`` overrides did."""
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_value(text: str) -> Any:
    """An override value: JSON when it parses (128, 0.5, true, [1, 2], null), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SupervisedConfig:
    """Read a JSON config, apply ``{"section.key": value}`` overrides, validate.

    Relative paths inside the config are taken as given (relative to the working directory), like the paper's.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--config {path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: the top level must be a JSON object")
    for dotted, value in (overrides or {}).items():
        set_path(raw, dotted, value)
    return config_from_dict(raw, str(path))


def split_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """``["--training.batchsize", "128", "--output_dir=x"]`` -> ``{"training.batchsize": 128, "output_dir": "x"}``.

    Any ``--key`` is taken (a section key with a dot, or a top-level key); keys the schema does not know are
    rejected when the config is built, naming them.
    """
    out: dict[str, Any] = {}
    tokens = list(extra)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise ConfigError(f"unrecognised argument {token!r}: overrides look like --section.key VALUE")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value (e.g. --{name} 128)")
            value = tokens[i + 1]
            i += 1
        out[name] = parse_value(value)
        i += 1
    return out


def require_file(path: str | None, key: str) -> Path:
    """An input file named by the config, or a one-line error naming the key."""
    if not path:
        raise ConfigError(f"{key}: not set")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key} {p}: no such file")
    return p
