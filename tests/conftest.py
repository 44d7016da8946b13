"""Shared test fixtures: one thread for tiny models, and one smoke cohort (with its preprocessing cache) per run;
each pytest-xdist worker on its own share of the cores."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture()
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine extra threads
    spin-wait for each other (steps then run many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory) -> dict[str, str]:
    """Config overrides that point ``cohort.data_dir`` and ``preprocessing.cache_dir`` at folders shared by the
    whole test run: the smoke cohort is generated (and preprocessed) once, by whichever test needs it first.
    Tests must not modify it; a test that needs its own cohort generates one under its ``tmp_path``."""
    base = tmp_path_factory.mktemp("smoke-workspace")
    return {"cohort.data_dir": str(base / "data"), "preprocessing.cache_dir": str(base / "cache")}


@pytest.fixture(scope="session")
def smoke_cohort(smoke_workspace) -> Path:
    """The folder of the shared smoke cohort (``manifest.csv``, images, oracle), generated on first use."""
    from nrfm.config_loading import load_config  # test-collection time stays free of the library's imports
    from nrfm.pipeline.context import ensure_cohort

    return ensure_cohort(load_config(SMOKE, smoke_workspace), progress=False).parent


@pytest.fixture(scope="session")
def hermetic(tmp_path_factory, smoke_workspace):
    """The test run's shared smoke cohort and cache (:func:`smoke_workspace`) and a folder for the runs' reports."""
    return dict(smoke_workspace), tmp_path_factory.mktemp("nrfm")


def pytest_configure(config):
    """Under pytest-xdist, each worker and everything it starts (notebook kernels, `nrfm` subprocesses, forked fit
    workers) runs on its own share of the CPUs. Unpinned, two workers' runs each size their thread pools to the whole
    machine and OpenMP threads spin-wait for descheduled siblings: two concurrent byol-only smoke runs took 251 s
    unpinned and 168 s with one core each (2-core machine). torch and nrfm size their threads from the affinity."""
    worker = getattr(config, "workerinput", None)
    if worker is None or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    index, count = int(worker["workerid"].removeprefix("gw")), int(worker["workercount"])
    share = len(cpus) // count
    if share >= 1:
        os.sched_setaffinity(0, cpus[index * share:(index + 1) * share])
        torch.set_num_threads(share)


def pytest_collection_modifyitems(config, items):
    """The end-to-end (``slow``) test files first, each file's tests kept together in their order: with `make test`'s
    two workers the longest files start at once and the short ones fill in around them."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group is kept
