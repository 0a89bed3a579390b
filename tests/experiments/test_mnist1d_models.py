"""The published MNIST-1D models: parameter counts by hand, shapes, the architecture's parts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.experiments import models


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear(i: int, o: int) -> int:
    return i * o + o


def conv1d(cin: int, cout: int, k: int) -> int:
    return cin * cout * k + cout


def out_length(length: int, k: int, s: int, p: int) -> int:
    return (length + 2 * p - k) // s + 1


L3 = out_length(out_length(out_length(40, 5, 2, 1), 3, 2, 1), 3, 2, 1)  # 40 → 19 → 10 → 5
GRU_DIRECTION = 3 * (6 * 1 + 6 * 6 + 6 + 6)  # r, z, n gates: W_ih, W_hh, b_ih, b_hh


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (models.mnist1d_logistic, linear(40, 10)),  # 410
        (models.mnist1d_mlp, linear(40, 100) + linear(100, 100) + linear(100, 10)),  # 15 210
        (
            models.mnist1d_cnn,
            conv1d(1, 25, 5) + 2 * conv1d(25, 25, 3) + linear(25 * L3, 10),  # 5 210
        ),
        (models.mnist1d_gru, 2 * GRU_DIRECTION + linear(2 * 6 * 40, 10)),  # 5 134
    ],
)
def test_parameter_counts_match_the_published_models(factory, expected):
    model = factory()
    assert n_params(model) == expected
    for x in (torch.randn(7, 40), torch.randn(7, 1, 40)):
        assert model(x).shape == (7, 10)
    assert L3 == 5


def test_published_sizes_in_numbers():
    counts = [n_params(f()) for f in (models.mnist1d_logistic, models.mnist1d_mlp,
                                      models.mnist1d_cnn, models.mnist1d_gru)]
    assert counts == [410, 15210, 5210, 5134]


def test_logistic_regression_is_affine():
    model = models.mnist1d_logistic().double()
    x, y = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(model(0.3 * x + 0.7 * y), 0.3 * model(x) + 0.7 * model(y))


def test_mlp_has_the_residual_connection():
    model = models.mnist1d_mlp().double()
    x = torch.randn(5, 40, dtype=torch.float64)
    h1 = F.relu(model.linear1(x))
    expected = model.linear3(h1 + F.relu(model.linear2(h1)))
    torch.testing.assert_close(model(x), expected)
    with torch.no_grad():  # with the middle layer zeroed the residual passes h1 through
        model.linear2.weight.zero_()
        model.linear2.bias.zero_()
    torch.testing.assert_close(model(x), model.linear3(h1))


def test_cnn_layers_and_forward_against_functional_convolutions():
    model = models.mnist1d_cnn().double()
    convs = [model.conv1, model.conv2, model.conv3]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 25, (5,), (2,), (1,)), (25, 25, (3,), (2,), (1,)), (25, 25, (3,), (2,), (1,))
    ]
    assert (model.linear.in_features, model.linear.out_features) == (125, 10)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    x = torch.randn(4, 40, dtype=torch.float64)
    h = x[:, None]
    for c in convs:
        h = F.relu(F.conv1d(h, c.weight, c.bias, stride=2, padding=1))
    assert h.shape == (4, 25, 5)
    torch.testing.assert_close(model(x), model.linear(h.reshape(4, -1)))


def test_cnn_with_batch_norm_variant():
    model = models.mnist1d_cnn(batch_norm=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 3 and n_params(model) == 5210 + 3 * 2 * 25
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, 40)).shape == (3, 10)


def test_gru_is_bidirectional_over_all_steps():
    model = models.mnist1d_gru().double()
    gru = model.gru
    settings = (gru.input_size, gru.hidden_size, gru.bidirectional, gru.batch_first)
    assert settings == (1, 6, True, True)
    assert model.linear.in_features == 480
    x = torch.randn(2, 40, dtype=torch.float64)
    outputs, _ = gru(x[..., None], torch.zeros(2, 2, 6, dtype=torch.float64))  # zero state
    torch.testing.assert_close(model(x), model.linear(outputs.reshape(2, -1)))
    # the backward direction carries the last step to the first output (damped over 40 steps,
    # ~1e-10 at initialisation), the forward one does not
    changed = x.clone()
    changed[:, -1] += 1.0
    first, first_changed = gru(x[..., None])[0][:, 0], gru(changed[..., None])[0][:, 0]
    assert torch.equal(first[:, :6], first_changed[:, :6])
    assert (first[:, 6:] - first_changed[:, 6:]).abs().min() > 1e-13


def test_models_are_registered_for_gin():
    import gin

    import curvlab.experiments.train  # noqa: F401 - registers train.*

    gin.parse_config(["train.model = @models.mnist1d_cnn", "models.mnist1d_cnn.channels = 3"])
    assert gin.query_parameter("train.model").selector == "models.mnist1d_cnn"
    assert models.mnist1d_cnn().conv1.out_channels == 3
