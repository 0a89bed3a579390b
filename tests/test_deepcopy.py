"""A deep copy of a hooked model (EMA / SWA copies) runs and adds nothing to the optimizer."""

import copy

import torch
from torch import nn

import curvlab


def test_deepcopy_of_a_hooked_model_runs_and_captures_nothing():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = curvlab.AdaFisher(model, lr=1e-2)
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    nn.functional.cross_entropy(twin(x), y).backward()  # the copy trains without errors
    assert all(not r.has_statistics for r in opt.layers)
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(r.has_statistics for r in opt.layers)
    opt.step()
    torch.testing.assert_close(twin(x), twin(x))
