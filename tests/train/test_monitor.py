"""Mixed precision only where the device runs it natively."""
import pytest
import torch


def test_bf16_only_where_the_device_runs_it_natively(monkeypatch):
    """An AVX2-only CPU emulates bf16 (a ResNet step 12x slower than float32): the kit runs float32 there, once
    warned; where oneDNN has bf16 kernels the autocast is on."""
    import warnings

    from nrfm.train import monitor

    cpu = torch.device("cpu")
    monkeypatch.setattr(monitor, "_BF16_FALLBACK_WARNED", set())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        with monitor.autocast_context(cpu, True):
            assert not torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per device type
        with monitor.autocast_context(cpu, True):
            assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    with monitor.autocast_context(cpu, True):
        assert torch.is_autocast_enabled("cpu")
    with monitor.autocast_context(cpu, True):
        assert torch.is_autocast_enabled("cpu")
    with monitor.autocast_context(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
