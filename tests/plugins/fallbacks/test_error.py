"""``fallback="error"``: uncovered parameters are refused, by name, with the two fixes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab
from curvlab.plugins.fallbacks.error import UncoveredParametersError

from .conftest import FALLBACK_NAMES


def test_construction_fails_naming_the_parameters(model):
    with pytest.raises(UncoveredParametersError) as info:
        curvlab.AdaFisher(model, fallback="error")
    text = str(info.value)
    assert text.startswith("fallback='error': 5 trainable parameter(s) have no layer curvature: ")
    for name in FALLBACK_NAMES:
        assert name in text
    assert "lstm.weight_ih_l0 [20, 4]: no adapter for LSTM" in text
    assert "scale [5]: not a parameter of the model's modules" not in text  # it is the root's
    assert "curvlab.register_layer(" in text and "fallback='squared_gradient'" in text
    assert isinstance(info.value, ValueError)


def test_fully_covered_model_is_accepted(model):
    model.lstm.requires_grad_(False)  # frozen parameters are not the optimizer's concern
    model.scale.requires_grad_(False)
    opt = curvlab.AdaFisher(model, fallback="error")
    assert opt.coverage().share == 1.0


def test_never_captured_layer_fails_at_the_first_curvature_step():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return nn.functional.linear(torch.tanh(self.a(x)), self.b.weight)

    model = Functional()
    opt = curvlab.AdaFisher(model, fallback="error")
    nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    with pytest.raises(UncoveredParametersError, match="b.weight \\[2, 4\\]: its layer never ran"):
        opt.step()
