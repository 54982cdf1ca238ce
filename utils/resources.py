"""Worker and thread counts capped to the CPUs this process may run on, so an absurd flag cannot hang the machine.

Why one function: ``--workers 100000`` used to fork 100000 processes (the handcrafted baseline hung); every CLI that
starts workers or threads passes its flag through ``cap_workers`` when its config is built, so the rule, and the
warning that names the flag, the value asked for and the value used, are the same everywhere.
"""

from __future__ import annotations

import os
import warnings


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (containers, ``taskset``), else all.

    ``os.cpu_count()`` counts the host's CPUs even when a container or a batch scheduler lends only a few, which is
    why the affinity mask comes first.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        count = os.cpu_count() or 1
    return max(1, count)


def cap_workers(flag: str, requested: int, *, per_cpu: int = 1, default: int | None = None,
                cpus: int | None = None) -> int:
    """``requested`` workers, or at most ``per_cpu`` per available CPU, with a RuntimeWarning when it caps.

    Parameters
    ----------
    flag:
        The flag as the user types it (``--num_workers``), named in the warning.
    requested:
        The value asked for; values at or below the limit (0 included: "no workers") are returned unchanged.
    per_cpu:
        Workers per CPU worth running: 1 for processes that compute, more for threads that mostly wait on disk.
    default:
        The flag's default. A default above a small machine's limit is capped without a warning: the user asked
        for nothing, so there is nothing to warn about.
    cpus:
        The CPU count to cap against; ``available_cpus()`` when None (given by tests).

    Returns
    -------
    int
        ``min(requested, per_cpu * cpus)``.
    """
    n_cpus = available_cpus() if cpus is None else max(1, int(cpus))
    limit = max(1, per_cpu * n_cpus)
    if requested <= limit:
        return requested
    if requested != default:
        per = f" ({per_cpu} per CPU)" if per_cpu > 1 else ""
        warnings.warn(f"{flag} {requested} exceeds the {n_cpus} CPU(s) available to this process; using {limit}{per}",
                      RuntimeWarning, stacklevel=2)
    return limit
