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


def finite_features(df: pd.DataFrame, features: list[str], source: str, *, csv_rows: bool = True,
                    hint: str = "drop those wells or features first", inf_hint: str | None = None) -> None:
    """Refuse NaN/inf feature values, naming how many rows, the first column and row (a chain needs finite profiles).

    Why one check for files and in-memory profiles: NaN and inf used to surface later as a variance filter that
    "kept no feature", a message about the wrong thing. ``csv_rows`` names the row as the file line; otherwise the
    plate/well (or the row index) is named. ``inf_hint`` replaces ``hint`` when infinities are present, since an
    overflow has another cause (a diverged model, fp16) than a missing value.
    """
    try:
        x = df[features].to_numpy(dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{source}: non-numeric values in feature columns ({str(exc).splitlines()[0]})") from None
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    r, c = np.argwhere(bad)[0]
    infinite = bool(np.isinf(x).any())
    kinds = " and ".join(k for k, present in (("NaN", bool(np.isnan(x).any())), ("inf", infinite)) if present)
    if csv_rows:
        where = f"CSV row {r + 2}"
    elif {"plate", "well"} <= set(df.columns):
        where = f"well {df['plate'].iloc[r]}/{df['well'].iloc[r]}"
    else:
        where = f"row {r}"
    raise DataError(f"{source}: {int(bad.any(axis=1).sum())} of {len(df)} rows have {kinds} feature values, first "
                    f"in column {features[c]} at {where}; {inf_hint if infinite and inf_hint else hint}")
