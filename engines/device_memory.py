"""A worker device's memory as torch sees it: the total (the default memory budget) and,
on CUDA, what torch's caching allocator holds: bytes in tensors (allocated) and bytes
taken from the driver (reserved, allocated included). Other devices (cpu, sim, none) have
no such figures: None."""

from __future__ import annotations


def is_cuda(device: str) -> bool:
    return device == "cuda" or device.startswith("cuda:")


def device_memory_gb(device: str) -> float | None:
    """A CUDA device's total memory (the default budget); None (unlimited) elsewhere."""
    if not is_cuda(device):
        return None
    import torch

    return float(torch.cuda.get_device_properties(torch.device(device)).total_memory) / 2**30


def cuda_memory_bytes(device: str) -> dict[str, int] | None:
    """``{"allocated_bytes", "reserved_bytes"}`` of torch.cuda on a CUDA device (0 before
    the process first uses it: reading them starts no CUDA context); None elsewhere."""
    if not is_cuda(device):
        return None
    import torch

    index = torch.device(device)
    return {"allocated_bytes": int(torch.cuda.memory_allocated(index)),
            "reserved_bytes": int(torch.cuda.memory_reserved(index))}
