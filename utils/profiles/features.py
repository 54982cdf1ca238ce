"""Which columns of a profile table are features: the paper's ``emb0..`` names, or CellProfiler compartments.

One detector for inference, the handcrafted baseline and evaluation, so the three never disagree about what a
feature is. Metadata never matches (CellProfiler's own ``*_Metadata_*`` columns included).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from utils.errors import DataError

FEATURE_PREFIX = "emb"
EMB_PATTERN = re.compile(r"^emb_?\d+$")
CP_PREFIXES: tuple[str, ...] = ("Cells_", "Cytoplasm_", "Nuclei_")


def embedding_names(dim: int, prefix: str = FEATURE_PREFIX) -> list[str]:
    """Name features like the paper (``emb0``, ``emb1``, ... unpadded) so its evaluation code reads them."""
    return [f"{prefix}{i}" for i in range(dim)]


def _split_kinds(columns: Sequence[object]) -> tuple[list[str], list[str]]:
    emb = [str(c) for c in columns if isinstance(c, str) and EMB_PATTERN.match(c)]
    cp = [str(c) for c in columns if isinstance(c, str) and c.startswith(CP_PREFIXES) and "metadata" not in c.lower()]
    return emb, cp


def detect_features(columns: Sequence[object], source: str) -> tuple[list[str], str]:
    """The feature columns and their kind ("embedding" or "CellProfiler"); none, or both kinds at once, is an error.

    Parameters
    ----------
    columns:
        The table's column names, in order (the order is kept).
    source:
        What to name in an error (a file or folder).
    """
    emb, cp = _split_kinds(columns)
    if emb and cp:
        raise DataError(
            f"{source}: mixed feature sets ({len(emb)} emb* columns, e.g. {emb[0]}, and {len(cp)} CellProfiler "
            f"columns, e.g. {cp[0]}); keep one set per folder"
        )
    if not emb and not cp:
        raise DataError(f"{source}: no feature columns (expected emb0.. / emb_0000.. or Cells_/Cytoplasm_/Nuclei_*)")
    return (emb, "embedding") if emb else (cp, "CellProfiler")


def feature_columns(df: pd.DataFrame) -> list[str]:
    """The feature columns of a table in table order (embeddings if any, else CellProfiler), possibly none."""
    emb, cp = _split_kinds(list(df.columns))
    return emb or cp


def finite_features(df: pd.DataFrame, features: list[str], source: str) -> None:
    """Refuse NaN/inf feature values, naming the first column and CSV row (a chain needs finite profiles)."""
    try:
        x = df[features].to_numpy(dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{source}: non-numeric values in feature columns ({str(exc).splitlines()[0]})") from None
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{source}: {int(bad.sum())} NaN/inf feature values, first in column {features[c]} at "
                        f"CSV row {r + 2}; drop those wells or features first")
