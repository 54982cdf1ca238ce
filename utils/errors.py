"""Exceptions that scripts turn into a one-line message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, a column, a flag or a value); the message names it."""


class DataError(UserError, ValueError):
    """A dataset CSV, image or metadata table that cannot be used as given."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded into the requested model."""


class ConfigError(UserError):
    """A flag or a combination of flags that cannot work."""


class DivergenceError(UserError, FloatingPointError):
    """Training produced a non-finite loss: a setting (learning rate, precision, temperature) needs changing."""


class CollapseError(UserError):
    """A run asked to stop on collapse (``--stop_on_collapse``) stayed collapsed; the message says what to try."""
