"""Host-to-device copies of small host-built tensors, without stalling the GPU stream."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; on CUDA through pinned memory with non_blocking, because a copy from
    pageable memory makes the host wait for the stream's queued work first."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
