"""Per-thread scratch memory for temporaries of the capture hooks, reused across steps (CPU).

On CPU a fresh activation-sized temporary per hook call is slow: large blocks come from the
C allocator, which returns them to the OS once freed, so every step faults the pages in and
zeroes them again (measured on the GPT benchmark, 2 cores: ``(x * x).sum(0)`` costs 3-4x more
inside the training step than in a loop). One grown-as-needed block per (thread, device, dtype)
avoids that; it holds as much memory as the largest temporary. CUDA tensors do not use it: the
caching allocator already reuses blocks, and a permanent block would add to the peak.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class _Blocks(threading.local):
    def __init__(self) -> None:
        self.blocks: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        #: views of the blocks by (shape, dtype, device), dropped when a block is replaced
        self.views: dict[tuple, Tensor] = {}


_blocks = _Blocks()


def scratch(
    shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A contiguous uninitialised tensor, valid until the next ``scratch`` call in this thread
    (hooks run one at a time per thread: autograd runs a device's hooks on one thread)."""
    blocks = _blocks
    view = blocks.views.get((shape, dtype, device))
    if view is not None:  # the common case: a shape seen before, costs one dict lookup
        return view
    n = 1
    for size in shape:
        n *= size
    key = (torch.device(device), dtype)
    block = blocks.blocks.get(key)
    if block is None or block.numel() < n:
        block = torch.empty(n, dtype=dtype, device=device)
        blocks.blocks[key] = block
        blocks.views = {  # views of the replaced block
            k: v for k, v in blocks.views.items() if (torch.device(k[2]), k[1]) != key
        }
    view = block[:n].view(shape)
    blocks.views[(tuple(shape), dtype, device)] = view
    return view


def release() -> None:
    """Drop this thread's scratch blocks (they are re-created on the next use)."""
    _blocks.blocks.clear()
    _blocks.views.clear()
