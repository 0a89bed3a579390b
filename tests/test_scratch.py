"""curvlab.scratch: reused per-thread temporaries of the capture hooks."""

import threading

import torch

from curvlab import scratch as scratch_module
from curvlab.scratch import release, scratch


def test_same_shape_reuses_memory_and_growth_replaces_stale_views() -> None:
    release()
    a = scratch((4, 3), torch.float32, torch.device("cpu"))
    assert a.shape == (4, 3) and a.is_contiguous()
    b = scratch(torch.Size([4, 3]), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.shape == (4, 3)
    small = scratch((2, 2), torch.float32, torch.device("cpu"))
    assert small.data_ptr() == a.data_ptr()  # one block, viewed at several shapes
    big = scratch((10, 10), torch.float32, torch.device("cpu"))  # the block grows
    assert big.shape == (10, 10)
    again = scratch((4, 3), torch.float32, torch.device("cpu"))
    # the cached view of the old block is gone: the new view lies in the new block
    assert again.data_ptr() == big.data_ptr()
    assert again.untyped_storage().nbytes() == big.untyped_storage().nbytes() >= 400
    # another dtype has its own block; the float32 views are kept
    d = scratch((4, 3), torch.float64, torch.device("cpu"))
    assert d.dtype == torch.float64 and d.data_ptr() != big.data_ptr()
    assert scratch((4, 3), torch.float32, torch.device("cpu")).data_ptr() == big.data_ptr()
    release()
    assert not scratch_module._blocks.blocks and not scratch_module._blocks.views


def test_threads_do_not_share_blocks() -> None:
    release()
    here = scratch((8,), torch.float32, torch.device("cpu"))
    other: list[int] = []
    thread = threading.Thread(
        target=lambda: other.append(scratch((8,), torch.float32, torch.device("cpu")).data_ptr())
    )
    thread.start()
    thread.join()
    assert other and other[0] != here.data_ptr()
    release()
