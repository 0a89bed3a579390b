"""The convolution's input factor from shifted correlations (plugins/adapters/convolution_gram.py)
against the Gram of its unfolded rows (float64).

The rows (``ConvolutionAdapter.input_rows``) are checked against one-hot "basis" filters and a
loop over windows in test_convolution.py, and their K-FAC factors against curvlinops in
tests/plugins/estimators/test_full.py; here the shifted Gram must equal ``rowsᵀ rows`` for
every stride-1 configuration, and the full estimator's factors with the path forced must
equal curvlinops' too.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from curvlab.plugins.adapters import convolution_gram
from curvlab.plugins.adapters.convolution import ConvolutionAdapter, padding_per_axis
from tests.plugins.estimators.test_full import curvlinops_factors, kfac_optimizer

DT = torch.float64
ADAPTER = ConvolutionAdapter()
CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def unfold_gram(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    rows = ADAPTER.input_rows(m, x)
    return rows.transpose(-1, -2) @ rows


def shifted(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x if x.dim() == len(m.kernel_size) + 2 else x.unsqueeze(0)
    p = convolution_gram.plan(
        tuple(x.shape[2:]), tuple(m.kernel_size), tuple(m.dilation), padding_per_axis(m)
    )
    return convolution_gram.shifted_gram(x, p, m.bias is not None)


@st.composite
def stride_one_convolutions(draw):
    rank = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4 if rank < 3 else 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    style = draw(st.sampled_from(["numbers", "same", "valid"]))
    padding = tuple(draw(st.integers(0, 4)) for _ in range(rank)) if style == "numbers" else style
    # an image at least as large as the dilated kernel, so that "valid" has an output
    largest = 9 if rank < 3 else 6
    side = tuple(
        draw(st.integers(max(3, (k - 1) * d + 1), max(largest, (k - 1) * d + 1)))
        for k, d in zip(kernel, dilation)
    )
    return dict(
        rank=rank,
        kernel_size=kernel,
        dilation=dilation,
        padding=padding,
        channels=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        side=side,
        batch=draw(st.sampled_from([None, 1, 3])),  # None: unbatched input
        seed=draw(st.integers(0, 1000)),
    )


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(stride_one_convolutions())
def test_shifted_gram_equals_the_unfold_gram(case):
    """Any rank, kernel, dilation and zero padding (numbers larger than the kernel, asymmetric
    "same" for even kernels, "valid"), with and without bias, batched or not."""
    torch.manual_seed(case["seed"])
    m = CLASSES[case["rank"]](
        case["channels"],
        2,
        case["kernel_size"],
        padding=case["padding"],
        dilation=case["dilation"],
        bias=case["bias"],
    ).to(DT)
    shape = (case["channels"], *case["side"])
    x = torch.randn(shape if case["batch"] is None else (case["batch"], *shape), dtype=DT)
    want = unfold_gram(m, x)
    got = shifted(m, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.transpose(-1, -2))  # exactly symmetric, as gram() makes it


def test_adapter_takes_the_path_where_it_is_cheaper_and_counts_the_rows():
    """64 channels, 3×3, 16×16 (ResNet-18's first stage at a smaller image): the adapter's
    statistic is the shifted Gram, equal to the unfold's, with N·positions rows. Below the
    dimension threshold, with stride 2, groups, another padding mode, a 4×4 image where the
    border strips cost as much as the unfold, or off the CPU, it declines (the estimator
    unfolds)."""
    torch.manual_seed(0)
    m = nn.Conv2d(64, 8, 3, padding=1, bias=True).to(DT)
    x = torch.randn(2, 64, 16, 16, dtype=DT)
    stat = ADAPTER.input_gram(m, x, DT)
    assert stat is not None and stat.count == 2 * 16 * 16
    torch.testing.assert_close(stat.total, unfold_gram(m, x), rtol=1e-12, atol=1e-10)

    declined = {
        "small": (nn.Conv2d(8, 8, 3, padding=1), torch.randn(2, 8, 16, 16)),
        "stride": (nn.Conv2d(64, 8, 3, stride=2, padding=1), x.float()),
        "groups": (nn.Conv2d(64, 8, 3, groups=2, padding=1), x.float()),
        "reflect": (nn.Conv2d(64, 8, 3, padding=1, padding_mode="reflect"), x.float()),
        "4x4": (nn.Conv2d(512, 8, 3, padding=1), torch.randn(2, 512, 4, 4)),
        "not on CPU": (m, x.to("meta")),  # measured on CPU only: a device keeps the unfold
    }
    for name, (module, inp) in declined.items():
        assert ADAPTER.input_gram(module, inp, torch.float32) is None, name


def test_statistic_is_accumulated_in_the_requested_dtype():
    """An fp32 input with a float64 factor: the products run in float64 (as the rows do)."""
    torch.manual_seed(1)
    m = nn.Conv2d(32, 4, 3, padding=1)
    x = torch.randn(3, 32, 12, 12)
    stat = ADAPTER.input_gram(m, x, DT)
    assert stat is not None and stat.total.dtype == DT
    torch.testing.assert_close(stat.total, unfold_gram(m.to(DT), x.to(DT)), rtol=1e-12, atol=1e-9)


def test_full_factors_with_the_path_forced_equal_curvlinops(monkeypatch):
    """K-FAC's A of a CNN whose stride-1 convolutions (bias, dilation, "same", asymmetric
    padding) all take the shifted path (thresholds lifted) equals curvlinops' (empirical,
    "expand") to 1e-8, as the unfold path does in test_full.py."""
    monkeypatch.setattr(convolution_gram, "MIN_DIMENSION", 0)
    monkeypatch.setattr(convolution_gram, "COST_FRACTION", float("inf"))
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=2, dilation=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(5, 3, (2, 3), padding=(0, 2)),
        nn.Flatten(),
        nn.Linear(3 * 7 * 10, 4),
    ).to(DT)
    x = torch.randn(5, 3, 8, 8, dtype=DT)
    y = torch.randint(0, 4, (5,))
    taken = []
    original = convolution_gram.shifted_gram
    monkeypatch.setattr(
        convolution_gram, "shifted_gram", lambda *a: taken.append(1) or original(*a)
    )
    A_ref, _ = curvlinops_factors(net, nn.CrossEntropyLoss(), x, y)
    opt = kfac_optimizer(net)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    assert len(taken) == 3  # every convolution took the path
    for name in ("0", "2", "4", "6"):
        torch.testing.assert_close(
            opt.curvature_state[name]["H"][0], A_ref[name], rtol=1e-8, atol=1e-12
        )
