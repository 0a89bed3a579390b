"""Small host → device copies that do not wait for the device.

A blocking host-to-device copy (``torch.tensor(data, device="cuda")``, ``.to("cuda")`` of a
pageable tensor) synchronises the stream: the host waits for every queued kernel. The step
and the hooks build a few small index/count tensors on the host (layouts, row counts); they go
through pinned memory with ``non_blocking=True`` instead, which only queues the copy (the
caching host allocator keeps the pinned block alive until the copy has run).
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device_async(host: Tensor, device: torch.device | str) -> Tensor:
    """``host`` (a CPU tensor) on ``device`` without a host-device synchronisation."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    try:
        pinned = host.pin_memory()
    except RuntimeError:  # no pinned memory for this backend: a plain (blocking) copy
        return host.to(device)
    return pinned.to(device, non_blocking=True)
