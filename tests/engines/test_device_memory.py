"""A device's memory figures: none but on CUDA (this machine has no GPU; the CUDA test runs
where one is)."""

from __future__ import annotations

import pytest
import torch

from engines.device_memory import cuda_memory_bytes, device_memory_gb


@pytest.mark.parametrize("device", ["cpu", "sim", "none"])
def test_other_devices_have_no_cuda_figures_and_no_budget(device: str) -> None:
    assert cuda_memory_bytes(device) is None
    assert device_memory_gb(device) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_figures_count_a_tensor_the_worker_holds() -> None:
    before = cuda_memory_bytes("cuda:0")
    assert before is not None
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda:0")
    after = cuda_memory_bytes("cuda:0")
    assert after is not None
    assert after["allocated_bytes"] - before["allocated_bytes"] >= held.numel()
    assert after["reserved_bytes"] >= after["allocated_bytes"]
    total_gb = device_memory_gb("cuda:0")
    assert total_gb is not None and after["reserved_bytes"] < total_gb * 2**30
