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


def single_thread_blas() -> None:
    """Keep numpy's and scipy's BLAS on one thread in this process from now on (torch keeps its own threads).

    The pipeline's BLAS calls are small (linear probes on a few hundred exams, PCA of 160-dimensional embeddings):
    a second BLAS thread gains nothing on them, and once torch has run, its OpenMP threads and OpenBLAS's wait
    for each other on the same two cores. Measured on the site-invariance stage of a default run (2 cores): 107 s
    with two BLAS threads, 27 s with one, every number identical.
    """
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency; only a run needs it

    threadpool_limits(1, user_api="blas")


def can_fork() -> bool:
    """Whether worker processes can be forked (they then share the parent's arrays without copying them)."""
    return "fork" in multiprocessing.get_all_start_methods()


__all__ = ["can_fork", "single_thread_blas", "usable_cores"]
