"""Reference backends compute the built-in factors themselves: another estimator is refused
instead of being silently replaced."""

import pytest
import torch
from torch import nn

import curvlab
from curvlab.plugins.estimators.banded import BandedEstimator


@pytest.mark.parametrize("backend", ["backpack", "asdl"])
def test_backend_refuses_an_estimator_it_would_replace(backend):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(NotImplementedError, match="cannot run the estimator BandedEstimator"):
        curvlab.CurvatureOptimizer(model, estimator=BandedEstimator(bandwidth=1), backend=backend)
    opt = curvlab.CurvatureOptimizer(model, estimator="diagonal", backend=backend)
    nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 2, (5,))).backward()
    opt.step()
