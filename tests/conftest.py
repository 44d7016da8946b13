"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture()
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine extra threads
    spin-wait for each other (steps then run many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
