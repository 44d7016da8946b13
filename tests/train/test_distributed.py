"""DDP pretraining with 2 CPU processes (gloo) against one process with the same global batch."""
from __future__ import annotations

import dataclasses
import os
import socket

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nrfm.train import distributed
from nrfm.config import Config, PretrainingConfig
from nrfm.train.pretrain import train_method

SIDE, N = 16, 24
METHODS = ("byol", "dino", "moco")


class Volumes(torch.utils.data.Dataset):
    def __init__(self, n: int = N):
        rng = np.random.default_rng(0)
        self.images = [torch.from_numpy(rng.normal(size=(4, SIDE, SIDE, SIDE)).astype(np.float32)) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i}


def manifest() -> pd.DataFrame:
    return pd.DataFrame({"subject_id": [f"s{i:02d}" for i in range(N)], "site": ["A", "B"] * (N // 2),
                         "split": ["train"] * 16 + ["val"] * 8, "idh": [float(i % 3 == 0) for i in range(N)]})


def config() -> Config:
    # fp32 so that the only differences between the runs are the order of floating-point reductions
    pre = PretrainingConfig(cnn_width=4, head_hidden_dim=16, head_out_dim=8, dino_out_dim=16, moco_memory_bank=8,
                            epochs=2, warmup_epochs=1, batch_size=4, view_size=(12, 12, 12),
                            local_view_size=(8, 8, 8), num_workers=0, threads=1, bf16=False, channels_last=False)
    return Config(pretraining=pre)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    with distributed.session(use_cuda=False) as d:
        assert d.world_size == world and d.rank == rank
        results = {}
        for method in METHODS:
            res = train_method(method, config(), Volumes(), manifest(), f"{out}/{method}", progress=False)
            state = torch.load(res.checkpoint, weights_only=True)["model"]
            results[method] = {"loss": res.log["loss"].tolist() if rank == 0 else [], "state": state,
                               "rows": len(res.log)}
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    ddp = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = {}
    threads = torch.get_num_threads()
    for method in METHODS:
        res = train_method(method, config(), Volumes(), manifest(), folder / "single" / method, progress=False)
        single[method] = {"loss": res.log["loss"].tolist(),
                          "state": torch.load(res.checkpoint, weights_only=True)["model"]}
    torch.set_num_threads(threads)
    return ddp, single, folder


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_processes_follow_the_single_process_loss_trajectory(runs, method):
    ddp, single, _ = runs
    ddp_loss, ref_loss = np.array(ddp[0][method]["loss"][1:]), np.array(single[method]["loss"][1:])
    assert len(ddp_loss) == 2 and np.isfinite(ddp_loss).all()
    np.testing.assert_allclose(ddp_loss, ref_loss, rtol=2e-3, atol=1e-4)
    assert ddp_loss[0] != ddp_loss[-1]  # it trained
    for name, ref in single[method]["state"].items():
        got = ddp[0][method]["state"][name]
        assert torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=2e-3), name


@pytest.mark.parametrize("method", METHODS)
def test_ranks_end_with_identical_weights_and_only_rank0_logs(runs, method):
    ddp, _, folder = runs
    for name, value in ddp[0][method]["state"].items():
        assert torch.equal(value, ddp[1][method]["state"][name]), name
    assert ddp[1][method]["loss"] == [] and ddp[0][method]["rows"] == 3  # epoch 0 (random init) + 2 epochs
    assert sorted(p.name for p in (folder / method).iterdir()) == ["backbone.pt", "last.pt"]


def test_sync_batchnorm_matches_batchnorm_of_the_global_batch(tmp_path):
    x = _bn_input().requires_grad_(True)
    ref_bn = torch.nn.BatchNorm3d(3)
    ref = ref_bn(x)
    (ref * torch.arange(ref.numel()).view_as(ref).float().sin()).sum().backward()
    port = _free_port()
    mp.spawn(_bn_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in (0, 1)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts[0]["running_var"], ref_bn.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[0]["running_mean"], ref_bn.running_mean, rtol=1e-5, atol=1e-6)


def _bn_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    with distributed.session(use_cuda=False):
        full = _bn_input()  # the parent's input; each rank normalises its half
        bn = distributed.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm3d(3)))
        assert type(bn[0]) is distributed.SyncBatchNorm
        x = full[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        y = bn(x)
        weights = torch.arange(full[:1].numel() * 8).view(8, 3, 4, 4, 4).float().sin()[rank * 4:(rank + 1) * 4]
        (y * weights).sum().backward()
        torch.save({"y": y.detach(), "grad": x.grad, "running_var": bn[0].running_var,
                    "running_mean": bn[0].running_mean}, f"{out}/bn{rank}.pt")
        assert dist.get_world_size() == 2


def _bn_input() -> torch.Tensor:
    return torch.randn(8, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
