"""Full K-FAC factors vs curvlinops (empirical Fisher, "expand"), and K-FAC on a deep linear
network where type-2 K-FAC is exact."""

import warnings

import pytest
import torch
from torch import nn

import curvlab

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from curvlinops import KFACLinearOperator


def kfac_optimizer(model, **kw):
    return curvlab.CurvatureOptimizer(
        model,
        lr=1e-3,
        gamma=0.0,  # the state is this step's estimate
        estimator=curvlab.registry.create("estimators", "full", per_sample=True),
        normalizer="identity",
        damping=curvlab.registry.create("damping", "factored", value=1e-3),
        update_rule="kfac",
        **kw,
    )


def curvlinops_factors(model, loss_func, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = KFACLinearOperator(
            model,
            loss_func,
            [p for p in model.parameters()],
            [(x, y)],
            fisher_type="empirical",
            kfac_approx="expand",
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        if hasattr(op, "compute_kronecker_factors"):
            op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)),
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 5, 2, dilation=2, bias=False),
            nn.Flatten(),
            nn.Linear(5 * 2 * 2, 4),
        ),
    ],
    ids=["mlp", "cnn"],
)
def test_full_factors_equal_curvlinops_empirical_expand(model):
    torch.manual_seed(0)
    net = model().double()
    x = (
        torch.randn(7, 6, dtype=torch.float64)
        if isinstance(net[0], nn.Linear)
        else torch.randn(7, 3, 8, 8, dtype=torch.float64)
    )
    y = torch.randint(0, 4, (7,))
    A_ref, G_ref = curvlinops_factors(net, nn.CrossEntropyLoss(), x, y)

    opt = kfac_optimizer(net)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert sorted(A_ref) == sorted(names)
    for name in names:
        state = opt.curvature_state[name]
        # curvlab: A = (1/R) Σ ā āᵀ, G = (1/R) Σ (N g)(N g)ᵀ over R = N·positions rows.
        # curvlinops "expand", mean-reduced loss: A = (1/(N·L)) Σ ā āᵀ, G = (1/N) Σ (N g)(N g)ᵀ,
        # so G_curvlinops = L · G_curvlab (L = output positions; 1 for Linear on 2-D input).
        module = dict(net.named_modules())[name]
        positions = 1
        if isinstance(module, nn.Conv2d):
            with torch.no_grad():
                out_shape = net[: names.index(name) * 2 + 1](x).shape  # conv outputs
            positions = out_shape[-1] * out_shape[-2]
        torch.testing.assert_close(state["H"][0], A_ref[name], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(positions * state["S"][0], G_ref[name], rtol=1e-8, atol=1e-12)


def test_kfac_on_deep_linear_network_equals_exact_block_natural_gradient():
    """Type-2 K-FAC is exact for deep linear networks with MSE: the Jacobian of the output
    w.r.t. a layer's output is the same for every sample, so each GGN block is A ⊗ B exactly.
    Type-2 curvature passes backpropagate the columns e_c of the per-sample loss Hessian's
    square root (ℓ_n = ½‖f_n − y_n‖², Hessian I), one backward per output c, sent as a
    mean-reduced loss sends them (÷N; per-sample scaling multiplies N back). curvlab averages
    the C passes' rows, so each seed carries √C to make A ⊗ G the exact GGN block
    (1/N) Σ_n J_nᵀ J_n. The K-FAC step must then equal (GGN + λI)⁻¹ ∇ from autograd Jacobians."""
    torch.manual_seed(0)
    N, d_in, d_h, C = 10, 4, 3, 2
    net = nn.Sequential(nn.Linear(d_in, d_h, bias=False), nn.Linear(d_h, C, bias=False)).double()
    x, y = torch.randn(N, d_in, dtype=torch.float64), torch.randn(N, C, dtype=torch.float64)
    lam, lr = 1e-2, 1.0
    opt = curvlab.CurvatureOptimizer(
        net,
        lr=lr,
        beta=0.0,
        gamma=0.0,
        estimator=curvlab.registry.create("estimators", "full", per_sample=True),
        normalizer="identity",
        damping=lam,  # constant, after the product: (A ⊗ G + λ)⁻¹
        update_rule="kfac",
    )
    # curvature passes: backpropagate the columns of the loss Hessian's square root
    for c in range(C):
        out = net(x)
        seed = torch.zeros_like(out)
        seed[:, c] = C**0.5 / N
        out.backward(seed)
    # the gradient of the actual loss
    params = list(net.parameters())
    with opt.pause_capture():
        loss = 0.5 * ((net(x) - y) ** 2).sum(1).mean()
        grads = torch.autograd.grad(loss, params)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()

    # exact GGN blocks: G_l = (1/N) Σ_n J_nᵀ J_n with J_n = ∂f_n/∂vec(W_l)
    def f_of(i, w):
        ws = list(before)  # the weights the curvature and gradient were taken at
        ws[i] = w
        return nn.functional.linear(nn.functional.linear(x, ws[0]), ws[1])

    for i, p in enumerate(params):
        J = torch.autograd.functional.jacobian(
            lambda w, i=i: f_of(i, w), before[i]
        )  # (N, C, out, in)
        J = J.reshape(N * C, -1)
        ggn = J.T @ J / N
        # curvlab: A = (1/N) Σ a aᵀ, G = (1/(C·N)) Σ_c Σ_n (N g_nc)(N g_nc)ᵀ with
        # N g_nc = √C J'ᵀ e_c (J' = ∂f/∂(layer output), the same for every n): G = J'ᵀJ',
        # and the GGN block is exactly A ⊗ J'ᵀJ'.
        K = ggn
        state = opt.curvature_state[str(i)]
        torch.testing.assert_close(
            torch.kron(state["S"][0], state["H"][0]), ggn, rtol=1e-10, atol=1e-12
        )
        step = torch.linalg.solve(
            K + lam * torch.eye(K.shape[0], dtype=K.dtype), grads[i].reshape(-1)
        )
        # vec is row-major over (out, in); the GGN above uses the same ordering
        torch.testing.assert_close(
            before[i] - lr * step.reshape(p.shape), p.detach(), rtol=1e-9, atol=1e-11
        )
