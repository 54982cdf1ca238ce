"""Entry-point wrapper so every script reports bad input as one line and a non-zero exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from utils.errors import UserError


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main`` and turn a UserError into ``error: <message>`` on stderr with exit code 2."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def bool_flag(value: str) -> bool:
    """Parse the paper's boolean flags (on/off, true/false, 1/0) for argparse."""
    lowered = str(value).strip().lower()
    if lowered in {"on", "true", "1", "yes"}:
        return True
    if lowered in {"off", "false", "0", "no"}:
        return False
    import argparse

    raise argparse.ArgumentTypeError(f"invalid boolean value {value!r}: use true/false, on/off or 1/0")
