"""nrfm bench: ratios (not times) on a tiny cohort, the record it writes, the table, the CLI."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from nrfm.bench import suite as bench
from nrfm.config import Config, PretrainingConfig

SIDE, N = 16, 20


class Volumes(torch.utils.data.Dataset):
    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = [torch.from_numpy(rng.normal(size=(4, SIDE, SIDE, SIDE)).astype(np.float32)) for _ in range(N)]

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i}


@pytest.fixture(scope="module")
def data():
    manifest = pd.DataFrame({"subject_id": [f"s{i}" for i in range(N)], "site": ["A", "B"] * (N // 2),
                             "split": ["train"] * 16 + ["val"] * 4, "idh": [float(i % 3 == 0) for i in range(N)]})
    return Volumes(), manifest


def tiny(**changes) -> Config:
    pre = PretrainingConfig(cnn_width=4, head_hidden_dim=16, head_out_dim=8, epochs=3, warmup_epochs=1, batch_size=4,
                            view_size=(12, 12, 12), num_workers=0, threads=1)
    return Config(pretraining=dataclasses.replace(pre, **changes))


def test_throughput_reports_both_rates_and_their_ratio(data, monkeypatch):
    # what the bench reports, not how fast this (shared) machine is: the ratio is computed from the two
    # recorded rates, and each loop gets the config it was given
    dataset, manifest = data
    seen = {}

    def fake(name, rate):
        def loop(cfg, dataset_, manifest_, method="byol", device="cpu"):
            seen[name] = (cfg, method, device)
            return rate
        return loop

    monkeypatch.setattr(bench, "nrfm_loop_rate", fake("nrfm", 50.0))
    monkeypatch.setattr(bench, "baseline_loop_rate", fake("baseline", 20.0))
    out = bench.throughput(tiny(), dataset, manifest, method="dino")
    assert out == {"nrfm_volumes_per_s": 50.0, "baseline_volumes_per_s": 20.0, "pretrain_speedup_vs_baseline": 2.5}
    assert seen["nrfm"][1:] == ("dino", "cpu") and seen["baseline"][1:] == ("dino", "cpu")


def test_fast_path_off_turns_every_switch_off_and_nothing_else():
    cfg = tiny(bf16=True, channels_last=True, batch_augment=True)
    off = bench.fast_path_off(cfg).pretraining
    assert (off.bf16, off.channels_last, off.batch_augment) == (False, False, False)
    assert dataclasses.replace(off, bf16=True, channels_last=True, batch_augment=True) == cfg.pretraining


def test_both_loops_run_and_report_finite_rates(data):
    # the real loops on a tiny cohort: finite positive rates and the ratio of exactly those numbers
    dataset, manifest = data
    out = bench.throughput(tiny(epochs=2), dataset, manifest)
    assert set(out) == {"nrfm_volumes_per_s", "baseline_volumes_per_s", "pretrain_speedup_vs_baseline"}
    assert np.isfinite(out["nrfm_volumes_per_s"]) and out["nrfm_volumes_per_s"] > 0
    assert np.isfinite(out["baseline_volumes_per_s"]) and out["baseline_volumes_per_s"] > 0
    assert out["pretrain_speedup_vs_baseline"] == out["nrfm_volumes_per_s"] / out["baseline_volumes_per_s"]


def test_step_rate_is_the_median_inside_epochs_after_warmup():
    times = [(0, 0.0), (0, 5.0), (1, 10.0), (1, 11.0), (1, 12.0), (1, 20.0), (2, 30.0), (2, 31.0)]
    # intervals inside epochs >= 1: 1, 1, 8, 1 -> median 1 s per batch of 4
    assert bench._step_rate(times, batch=4) == pytest.approx(4.0)


def test_flop_count_of_a_step_matches_the_convolution_formula():
    # a step of a one-layer model: forward 2*MACs, backward 2x that (input and weight gradients)
    conv = torch.nn.Conv3d(4, 8, 3, bias=False)
    x = torch.randn(2, 4, 10, 10, 10, requires_grad=True)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        conv(x).sum().backward()
    macs = 2 * 8 * 8 ** 3 * 4 * 27
    assert counter.get_total_flops() == 3 * 2 * macs
    result = bench.flops_fraction(tiny(), (SIDE, SIDE, SIDE), repeats=2)
    assert result["step_gflop"] > 0 and 0 < result["flops_fraction_of_matmul"] < 1.5


def test_record_keys_merge_and_table(tmp_path):
    first = {key: None for key in bench.KEYS}
    first.update(pretrain_speedup_vs_baseline=2.5, machine=bench.machine_record(), method="byol",
                 details={"throughput": {"nrfm_volumes_per_s": 50.0, "baseline_volumes_per_s": 20.0,
                                         "pretrain_speedup_vs_baseline": 2.5}})
    path = bench.write_record(first, tmp_path)
    second = {key: None for key in bench.KEYS}
    second.update(smoke_run_seconds=120.0, machine=bench.machine_record(), method="byol",
                  details={"smoke": {"seconds": 120.0, "returncode": 0, "peak_rss_mib": 900.0}})
    assert bench.write_record(second, tmp_path) == path
    saved = json.loads(path.read_text())
    assert saved["pretrain_speedup_vs_baseline"] == 2.5 and saved["smoke_run_seconds"] == 120.0
    assert saved["default_run_seconds"] is None and {"throughput", "smoke"} <= set(saved["details"])
    assert {"cpu", "avx512_bf16", "amx_bf16", "cores", "torch", "cuda_device"} <= set(saved["machine"])
    table = bench.format_table(saved)
    assert "2.50x" in table and "smoke pipeline" in table and "Machine:" in table


def test_unknown_part_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown benchmark part\(s\) \['warp'\]; valid: \['throughput'"):
        bench.run_benchmarks(parts=["warp"], out_dir=tmp_path)


def test_speedup_ceiling_is_the_matmul_peak_over_the_baseline_rate():
    # 2 GFLOP per step of 16 volumes = 0.125 GFLOP per volume; at 400 GFLOP/s that is 3200 volumes/s at best
    flops = {"step_gflop": 2.0, "batch_size": 16, "matmul_gflops": 400.0, "matmul_gflops_fp32": 200.0}
    out = bench.speedup_ceiling({"baseline_volumes_per_s": 800.0}, flops)
    assert out["volumes_per_s_at_matmul_peak"] == pytest.approx(3200.0)
    assert out["pretrain_speedup_ceiling"] == pytest.approx(4.0) and out["bf16_over_fp32_matmul"] == pytest.approx(2.0)
    record = {"machine": bench.machine_record(), "method": "byol", "details": {"ceiling": out}}
    assert "4.00x" in bench.format_table(record)
