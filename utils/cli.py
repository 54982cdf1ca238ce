"""Entry-point wrapper so every script reports bad input as one line and a non-zero exit code."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from utils.errors import UserError

# what the machine, not the program, got wrong: a full disk or quota, a file-size limit, a permission, a read-only or
# failing file system. Each is the user's to fix, so each gets one line naming the path, never a traceback
IO_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                       errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE})


def io_error_message(exc: OSError) -> str | None:
    """``<path>: <reason>`` for an I/O error the user must fix (see IO_ERRNOS), None for any other OSError."""
    if exc.errno not in IO_ERRNOS:
        return None
    reason = exc.strerror or os.strerror(exc.errno)
    return f"{exc.filename}: {reason}" if exc.filename else f"{reason} (while reading or writing a file)"


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main`` and turn a UserError, or an I/O error of the machine (disk full, permission, read-only),
    into ``error: <message>`` on stderr with exit code 2."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        message = io_error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
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
    raise argparse.ArgumentTypeError(f"invalid boolean value {value!r}: use true/false, on/off or 1/0")


def column_pair(value: str) -> tuple[str, str]:
    """Parse ``SRC=DST`` for ``--map``, the one spelling every CLI that renames columns accepts."""
    src, sep, dst = value.partition("=")
    if not sep or not src.strip() or not dst.strip():
        raise argparse.ArgumentTypeError(f"invalid --map {value!r}: use SOURCE=DEST, e.g. Metadata_Well=well")
    return src.strip(), dst.strip()


def add_metadata_flags(group: Any) -> None:
    """``--platemap`` and ``--map`` for a CLI that reads a site CSV; ``data.schema.load_site_table`` consumes both."""
    group.add_argument("--platemap", default=None, metavar="FILE",
                       help="per-well metadata (CSV, or TSV as .tsv/.txt) joined to the sites on plate and well, or on "
                            "well alone when it has no plate column (Metadata_* names are recognised)")
    group.add_argument("--map", dest="column_map", type=column_pair, action="append", default=[], metavar="SRC=DST",
                       help="copy column SRC of the site CSV and plate map onto DST, e.g. "
                            "--map Metadata_Compound=perturbation_id (repeatable)")


SPELLING_NOTE = ("Every long flag takes both spellings, --a_b and --a-b; the help lists the one the paper uses "
                 "(for flags the paper did not have, the one this tool uses).")


def alternate_spelling(flag: str) -> str | None:
    """``--a_b`` <-> ``--a-b`` for a long flag (None for short flags and single words)."""
    if not flag.startswith("--"):
        return None
    body = flag[2:]
    if "_" in body:
        return "--" + body.replace("_", "-")
    if "-" in body:
        return "--" + body.replace("-", "_")
    return None


def respell(argv: Sequence[str], known: Iterable[str]) -> list[str]:
    """Rewrite each ``--flag[=value]`` that the parser does not know into its other spelling when that one is known.

    Pure and order-preserving; stops at ``--`` so positional values are never touched.
    """
    known = set(known)
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        name, sep, value = token.partition("=")
        other = alternate_spelling(name)
        if name not in known and other is not None and other in known:
            token = other + sep + value
        out.append(token)
    return out


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that accepts both spellings of every long flag (``--norm_method`` and ``--norm-method``).

    Why: the paper's flags use underscores, several of ours used hyphens; users type either. Flags are stored
    once, under the spelling given to ``add_argument``, so ``--help`` shows the paper's spelling first.
    """

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        """Respell the command line, then parse it as argparse does."""
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(respell(argv, self._option_string_actions), namespace)
