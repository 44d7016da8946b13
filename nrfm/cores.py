"""The cores this process may use and whether it can fork workers: one answer for every part that splits work."""
from __future__ import annotations

import multiprocessing
import os


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity where the platform reports one, else ``os.cpu_count``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def can_fork() -> bool:
    """Whether worker processes can be forked (they then share the parent's arrays without copying them)."""
    return "fork" in multiprocessing.get_all_start_methods()


__all__ = ["can_fork", "usable_cores"]
