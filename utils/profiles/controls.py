"""The one control-well resolver: inference, the handcrafted baseline and evaluation all ask it which wells are
negative controls, so the three cannot disagree.

A rule is a pandas query. ``--control-query`` wins; otherwise ``--controls`` names a preset (``DMSO``: the DMSO
perturbation, ``negcon``: ``control_type == negcon``), ``auto`` (negcon when the table annotates it, else DMSO), or,
for evaluation, a list of perturbation ids (those ids, or ``control_type == negcon`` where that column exists).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from utils.errors import ConfigError, DataError

CONTROL_PRESETS: dict[str, str] = {
    "DMSO": "perturbation_id == 'DMSO'",
    "negcon": "control_type == 'negcon'",
}
CONTROL_CHOICES: tuple[str, ...] = ("auto", *CONTROL_PRESETS)
PRESET_COLUMNS: dict[str, tuple[str, str]] = {"DMSO": ("perturbation_id", "DMSO"), "negcon": ("control_type", "negcon")}
SHOWN_VALUES = 5
NO_WELLS = ("no wells left to normalise: every well was dropped because its features are all NaN (a degenerate model "
            "output, e.g. a diverged checkpoint, or no tile passed the cell rule)")


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
        ConfigError for an unknown ``controls`` value; DataError for an empty ``df`` (no wells survived: saying
        "no controls" would blame the wrong thing) and (``require_controls``) when an explicit
        ``--controls`` preset or ``--control-query`` matches no well. ``auto`` matching
        nothing is left to the steps that need controls, so a chain without them runs on a table without them.
    """
    if not len(df):
        raise DataError(NO_WELLS)
    if control_query:
        require_controls(df, control_query, "--control-query")
        return control_query
    if controls in CONTROL_PRESETS:
        require_controls(df, CONTROL_PRESETS[controls], f"--controls {controls}")
        return CONTROL_PRESETS[controls]
    if controls != "auto":
        raise ConfigError(f"--controls {controls!r} is not one of auto, {', '.join(CONTROL_PRESETS)}")
    if "control_type" in df.columns and (df["control_type"] == "negcon").any():
        return CONTROL_PRESETS["negcon"]
    return CONTROL_PRESETS["DMSO"]


def _values(series: pd.Series) -> str:
    """A few distinct values of a column, most frequent first, for an error message."""
    counts = series.dropna().astype(str).value_counts()
    shown = ", ".join(repr(v) for v in counts.index[:SHOWN_VALUES])
    more = f" and {len(counts) - SHOWN_VALUES} more" if len(counts) > SHOWN_VALUES else ""
    return f"{shown}{more}" if shown else "only empty cells"


def no_match_message(df: pd.DataFrame, query: str, what: str) -> str:
    """Why ``query`` selects no well of ``df``, naming the column it reads and a few values that column does hold.

    Why: "no control wells" alone sends the user looking for a bug; "column perturbation_id has no 'DMSO' (it has
    'EMPTY', 'A', ...)" shows the misspelling or the other convention at once.
    """
    if not len(df):
        return NO_WELLS
    named = [c for c in dict.fromkeys(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", query)) if c in df.columns]
    literal = re.findall(r"""['"]([^'"]*)['"]""", query)
    if not named:
        return f"{what}: no control wells match {query!r} in {len(df)} wells"
    column = named[0]
    wanted = f" has no {literal[0]!r}" if literal else " gives no match"
    return (f"{what}: no control wells match {query!r} in {len(df)} wells: column {column}{wanted} "
            f"(it has {_values(df[column])})")


def require_controls(df: pd.DataFrame, query: str, what: str) -> np.ndarray:
    """``control_mask(df, query)``, or a one-line DataError naming ``what``, the column and the values it holds.

    A selection the user made explicitly (``--controls DMSO``, ``--control-query``) that matches nothing is an error
    even where no step needs controls, because the numbers would otherwise be the default's without a word. An empty
    table is reported as such (no wells), never as missing controls.
    """
    if not len(df):
        raise DataError(NO_WELLS)
    preset = next((k for k, v in CONTROL_PRESETS.items() if v == query), None)
    if preset is not None and PRESET_COLUMNS[preset][0] not in df.columns:
        column = PRESET_COLUMNS[preset][0]
        raise DataError(f"{what}: the table has no {column} column to select {PRESET_COLUMNS[preset][1]!r} from "
                        f"(columns: {', '.join(map(str, list(df.columns)[:8]))}{', ...' if df.shape[1] > 8 else ''})")
    mask = control_mask(df, query)
    if not mask.any():
        raise DataError(no_match_message(df, query, what))
    return mask


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
