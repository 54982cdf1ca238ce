"""The one control-well resolver: inference, the handcrafted baseline and evaluation all ask it which wells are
negative controls, so the three cannot disagree.

A rule is a pandas query. ``--control-query`` wins; otherwise ``--controls`` names a preset (``DMSO``: the DMSO
perturbation, ``negcon``: ``control_type == negcon``), ``auto`` (negcon when the table annotates it, else DMSO), or,
for evaluation, a list of perturbation ids (those ids, or ``control_type == negcon`` where that column exists).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from utils.errors import ConfigError

CONTROL_PRESETS: dict[str, str] = {
    "DMSO": "perturbation_id == 'DMSO'",
    "negcon": "control_type == 'negcon'",
}
CONTROL_CHOICES: tuple[str, ...] = ("auto", *CONTROL_PRESETS)


def ids_query(ids: Sequence[str], df: pd.DataFrame) -> str:
    """Evaluation's rule as a query: perturbation_id among ``ids`` (compared as text), or negcon where annotated."""
    query = f"perturbation_id.astype('str').isin({[str(i) for i in ids]!r})"
    if "control_type" in df.columns:
        query += " or control_type.astype('str') == 'negcon'"
    return query


def resolve_control_query(df: pd.DataFrame, controls: str = "auto", control_query: str | None = None) -> str:
    """Pick the pandas query that marks negative-control wells: explicit, a preset, or negcon when annotated.

    Parameters
    ----------
    df:
        The profiles the query will run on; read only by ``auto``, to see whether ``control_type`` marks negcon wells.
    controls:
        ``auto`` (``control_type == 'negcon'`` when any row is so annotated, else ``perturbation_id == 'DMSO'``) or a
        key of ``CONTROL_PRESETS`` (``DMSO``, ``negcon``).
    control_query:
        An explicit pandas query (``--control-query``); when non-empty it wins and ``controls`` is not checked.

    Returns
    -------
    str
        The query text, not a mask, so it can be written to run.json and applied per plate with ``control_mask``.
        ConfigError for an unknown ``controls`` value; the query itself is checked only by ``control_mask``.
    """
    if control_query:
        return control_query
    if controls in CONTROL_PRESETS:
        return CONTROL_PRESETS[controls]
    if controls != "auto":
        raise ConfigError(f"--controls {controls!r} is not one of auto, {', '.join(CONTROL_PRESETS)}")
    if "control_type" in df.columns and (df["control_type"] == "negcon").any():
        return CONTROL_PRESETS["negcon"]
    return CONTROL_PRESETS["DMSO"]


def control_mask(df: pd.DataFrame, query: str) -> np.ndarray:
    """Boolean mask of the rows matched by the control query, with a one-line error for a bad query.

    Parameters
    ----------
    df:
        The profiles to mark. Rows are matched by index label, so give ``df`` a unique index.
    query:
        A pandas query evaluated with the python engine (``resolve_control_query`` or ``ids_query``).

    Returns
    -------
    numpy.ndarray
        bool (len(df),) in row order, True for the control rows; a mask rather than a filtered frame, so callers
        can fit on controls and still keep every row. ConfigError naming the query when pandas cannot evaluate it.
    """
    try:
        selected = df.query(query, engine="python").index
    except Exception as exc:  # pandas raises many types for a bad expression
        raise ConfigError(f"control query {query!r} cannot be evaluated: {exc}") from exc
    return df.index.isin(selected)
