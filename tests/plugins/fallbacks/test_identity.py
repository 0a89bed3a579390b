"""``fallback="identity"`` (the default): F = 1 + λ (paper) or exactly 1 (official code)."""

from __future__ import annotations

import pytest
import torch

import curvlab

from .conftest import FALLBACK_NAMES, LAM, loss_of, make_batches

pytestmark = pytest.mark.filterwarnings("ignore::curvlab.CurvatureFallbackWarning")


@pytest.mark.parametrize(
    "make, value",
    [
        (lambda m: curvlab.AdaFisher(m, lr=1e-2), 1 + LAM),
        (lambda m: curvlab.AdaFisher(m, lr=1e-2, fallback="identity"), 1 + LAM),
        (lambda m: curvlab.AdaFisher(m, lr=1e-2, variant="official"), 1.0),
        (lambda m: curvlab.CurvatureOptimizer(m, lr=1e-2, damp_fallback=False), 1.0),
    ],
    ids=["paper-default", "paper-named", "official", "damp_fallback-false"],
)
def test_constant_curvature_and_first_step(model, make, value):
    opt = make(model)
    assert type(opt.fallback).__name__ == "IdentityFallback"
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in FALLBACK_NAMES}
    loss_of(model, make_batches(1)[0]).backward()
    opt.step()
    for name in FALLBACK_NAMES:
        p = params[name]
        assert torch.equal(opt.preconditioner(p), torch.full_like(p, value))
        # m̂ = g at step 1: θ ← θ − α g / F (official and paper alike, no weight decay)
        torch.testing.assert_close(
            p.detach(), before[name] - 1e-2 * p.grad / value, rtol=1e-15, atol=0
        )
        assert not any(k.startswith("fallback") for k in opt.state[p])  # identity keeps no state


def test_warning_states_the_consequence_and_the_fixes(model):
    with pytest.warns(curvlab.CurvatureFallbackWarning) as record:
        curvlab.AdaFisherW(model)
    (warning,) = record
    text = str(warning.message)
    assert text.startswith(
        "5 trainable parameter(s) have no layer curvature and get the "
        "'identity' fallback rule: identity curvature F = 1 + λ, so their "
        "steps are up to 1/λ times smaller"
    )
    for name in FALLBACK_NAMES:
        assert name in text
    assert "no adapter for LSTM" in text
    assert "curvlab.register_layer(" in text and "fallback='squared_gradient'" in text
    with pytest.warns(curvlab.CurvatureFallbackWarning, match="F = 1, so their steps"):
        curvlab.AdaFisherW(model, variant="official")


def test_unknown_fallback_name_lists_the_registered_ones(model):
    with pytest.raises(
        curvlab.registry.UnknownPluginError,
        match="unknown fallbacks plugin 'adam'; registered fallbacks: error, "
        "identity, squared_gradient",
    ):
        curvlab.AdaFisher(model, fallback="adam")
