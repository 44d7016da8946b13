"""nrfm.cores: the one answer to how many cores a process may use."""
import os

from nrfm import cores


def test_usable_cores_follows_the_affinity_and_falls_back_to_cpu_count(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        assert cores.usable_cores() == len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # pinned to one core
        assert cores.usable_cores() == 1
        monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert cores.usable_cores() == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one core, never zero
    assert cores.usable_cores() == 1


def test_no_fork_means_no_worker_processes(monkeypatch):
    from nrfm.eval import summary

    monkeypatch.setattr(summary, "usable_cores", lambda: 4)
    monkeypatch.setattr(summary, "can_fork", lambda: True)
    assert summary._verdict_workers(3) == 3 and summary._verdict_workers(9) == 4
    monkeypatch.setattr(summary, "can_fork", lambda: False)
    assert summary._verdict_workers(9) == 0


def test_single_thread_blas_limits_numpy_blas_and_leaves_torch_alone():
    import subprocess
    import sys

    code = ("import torch\nfrom threadpoolctl import threadpool_info\nfrom nrfm.cores import single_thread_blas\n"
            "torch.set_num_threads(2)\nsingle_thread_blas()\n"
            "print(sorted({i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}), "
            "torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[1]", "2"]
