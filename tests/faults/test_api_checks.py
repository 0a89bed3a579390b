"""Optimizer API misuse that used to train wrongly or fail late: eval-mode training, complex
parameters, a parameter listed twice, parameters of another model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.optimizer import CurvatureNotCapturedWarning


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def step(model, opt, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_training_in_eval_mode_warns_once():
    model = mlp()
    opt = curvlab.AdaFisher(model)
    model.eval()
    with pytest.warns(CurvatureNotCapturedWarning, match=r"eval mode.*model\.train\(\)"):
        step(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        step(model, opt, seed=1)
        model.train()
        step(model, opt, seed=2)
    assert opt.curvature_state  # captured once in training mode


def test_training_mode_and_evaluation_forwards_do_not_warn():
    model = mlp()
    opt = curvlab.AdaFisher(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, opt)
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 4))  # an evaluation between steps
        model.train()
        step(model, opt, seed=1)


def test_complex_parameters_are_rejected_at_construction():
    model = mlp()
    model.register_parameter("phase", nn.Parameter(torch.ones(3, dtype=torch.complex64)))
    with pytest.raises(ValueError, match=r"parameter phase .* is complex \(torch.complex64\)"):
        curvlab.AdaFisher(model)


def test_a_parameter_listed_twice_is_rejected():
    model = mlp()
    params = [model[0].weight, model[0].bias, model[0].weight, model[2].weight]
    with pytest.raises(ValueError, match=r"parameter 0.weight is listed twice in param group 0"):
        curvlab.AdaFisher(model, params=params)
    opt = curvlab.AdaFisher(model, params=[model[0].weight])
    with pytest.raises(ValueError, match=r"2.bias is listed twice in param group 1"):
        opt.add_param_group({"params": [model[2].bias, model[2].bias]})
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        opt.add_param_group({"params": [model[0].weight]})


def test_parameters_of_another_model_are_named_as_such():
    model, other = mlp(), mlp()
    with pytest.raises(ValueError, match="none of the 4 parameters given to the optimizer belong"):
        curvlab.AdaFisher(model, params=other.parameters())
    # a model without supported layers keeps its own message
    with pytest.raises(ValueError, match="no layer that the adapters"):
        curvlab.AdaFisher(nn.Sequential(nn.PReLU()))
