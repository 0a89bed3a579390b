"""``curvlab bench`` additions: ASDL's K-FAC as a baseline, and the K-FAC / banded rows.

**ASDL's K-FAC** (``asdl_kfac``, when ``asdl`` (PyPI ``asdfghjkl``) is importable) is the K-FAC
baseline of the AdaFisher paper (SPEC §6): ``torch.optim.SGD`` (lr 1e-3: without curvlab's KL
clip, ASDL's steps at λ = 1e-3 diverge at 1e-2 on the fixed benchmark batch, and its Cholesky
then fails on NaN factors; the cost of a step does not depend on lr) with momentum 0.9 on gradients
preconditioned by ``asdl.KfacGradientMaker`` (empirical Fisher, ``fisher_emp``), curvature
every 10 steps, inverses every 100 (``PreconditioningConfig(curvature_upd_interval=10,
preconditioner_upd_interval=100)``), factor EMA ``ema_decay = 1 − γ = 0.05`` (curvlab's K-FAC
γ = 0.95), and **the damping of curvlab's K-FAC** (``configs/kfac.gin``: λ = 1e-3 split
between the factors by π, which is also ASDL's rule). A step is ASDL's
``forward_and_backward()`` (forward, backward, curvature and inverses when due, the
preconditioning of every gradient) followed by ``SGD.step()``. NVTX ranges, which ASDL opens
unconditionally and which fail on a CPU-only torch, are replaced by no-ops while it runs.

**curvlab rows at the same intervals**: ``kfac_c10_i100`` (``configs/kfac.gin``, curvature
every 10 steps, inverses every 100: the inverse solve of factored damping), ``kfac_eigen_c10_i100``
(the same with ``solver="eigen"``, the eigenbasis solve curvlab used before), ``banded_c10_i100``
(``configs/banded_adafisher.gin``, bandwidth 8, block solve) and ``banded_exact_c10_i100``
(the exact eigenbasis solve of the band). Like every interval setting they are timed over whole
periods (100 steps) and compared by the mean.

**Workloads** of the K-FAC comparison on CPU (issue 17): ``mlp`` (3072-1024-512-10, batch 64,
already in bench.py) and ``resnet18_b16`` (ResNet-18 CIFAR at batch 16).

Example::

    curvlab bench --models mlp,resnet18_b16 \\
        --optimizers adam,asdl_kfac,kfac_c10_i100,banded_c10_i100 --steps 100 --rounds 1
"""

from __future__ import annotations

import contextlib
import importlib.util
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: curvature / inverse intervals of the K-FAC comparison (the paper's K-FAC baseline setting)
CURVATURE_INTERVAL = 10
INVERSE_INTERVAL = 100
#: curvlab's K-FAC damping (configs/kfac.gin: damping.factored.value), used by both
KFAC_DAMPING = 1e-3
#: models ASDL's baseline runs on (classification losses with a ``reduction`` argument)
ASDL_MODELS = ("mlp", "resnet18", "resnet18_b16", "resnet50")


def asdl_available() -> bool:
    return importlib.util.find_spec("asdl") is not None


@contextlib.contextmanager
def _no_nvtx() -> Iterator[None]:
    """ASDL opens ``torch.cuda.nvtx`` ranges unconditionally; a CPU-only torch raises there."""
    import asdl.operations.operation as operation
    import asdl.precondition.natural_gradient as natural_gradient

    modules = (operation, natural_gradient)
    saved = [m.nvtx for m in modules]
    shim = types.SimpleNamespace(range=contextlib.nullcontext)
    for m in modules:
        m.nvtx = shim
    try:
        yield
    finally:
        for m, nvtx in zip(modules, saved):
            m.nvtx = nvtx


class AsdlKfac:
    """ASDL's K-FAC baseline (module docstring) behind the benchmark's step protocol:
    ``train_step(model, x, y, loss_fn)`` is one whole training step."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = KFAC_DAMPING,
        curvature_interval: int = CURVATURE_INTERVAL,
        inverse_interval: int = INVERSE_INTERVAL,
        ema_decay: float = 0.05,
    ) -> None:
        from asdl import FISHER_EMP, KfacGradientMaker, PreconditioningConfig

        self.curvature_interval = curvature_interval
        self.inverse_interval = inverse_interval
        self.damping = damping
        config = PreconditioningConfig(
            damping=damping,
            curvature_upd_interval=curvature_interval,
            preconditioner_upd_interval=inverse_interval,
            ema_decay=ema_decay,
        )
        self.grad_maker = KfacGradientMaker(model, config, fisher_type=FISHER_EMP)
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)

    def train_step(
        self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[..., Tensor]
    ) -> Tensor:
        self.sgd.zero_grad(set_to_none=True)
        # ASDL divides its sum-reduced curvature pass by this (a mean-reduced loss)
        self.grad_maker.config.data_size = len(x)
        with _no_nvtx(), warnings.catch_warnings():
            # ASDL's module backward hooks: torch warns on every curvature step
            warnings.filterwarnings("ignore", "Using a non-full backward hook", FutureWarning)
            logits = self.grad_maker.setup_model_call(model, x)
            # ASDL switches the reduction to "sum" on curvature steps (and divides back)
            self.grad_maker.setup_loss_call(F.cross_entropy, logits, y)
            _, loss = self.grad_maker.forward_and_backward()
        self.sgd.step()
        return loss

    def __repr__(self) -> str:
        return (
            f"ASDL KfacGradientMaker(fisher_emp, damping={self.damping:g}, "
            f"curvature_upd_interval={self.curvature_interval}, "
            f"preconditioner_upd_interval={self.inverse_interval}) + SGD(momentum=0.9)"
        )


def _config_rows(config: str, *bindings: str) -> Callable[[nn.Module], Any]:
    def build(model: nn.Module) -> torch.optim.Optimizer:
        from curvlab.config import CONFIG_ROOT, build_optimizer

        return build_optimizer(model, CONFIG_ROOT / config, bindings=list(bindings))

    return build


_INTERVALS = (
    f"optimizer.curvature_interval = {CURVATURE_INTERVAL}",
    f"optimizer.inverse_interval = {INVERSE_INTERVAL}",
)


def register(
    optimizers: dict[str, Any],
    workloads: dict[str, dict[str, Callable[[], Any]]],
    spec: type,
    resnet: Callable[[int, int], Any],
) -> None:
    """Add the rows and workloads above to bench.py's tables (``spec``: its OptimizerSpec,
    ``resnet(depth, batch)``: its ResNet workload)."""
    workloads["resnet18_b16"] = {
        "cuda": lambda: resnet(18, 256),
        "cpu": lambda: resnet(18, 16),
        "quick": lambda: resnet(18, 2),
    }
    interval = f"curvature_interval={CURVATURE_INTERVAL}, inverse_interval={INVERSE_INTERVAL}"
    optimizers["kfac_c10_i100"] = spec(
        f"configs/kfac.gin, {interval} (factored damping: inverse solve)",
        _config_rows("kfac.gin", *_INTERVALS),
    )
    optimizers["kfac_eigen_c10_i100"] = spec(
        f"configs/kfac.gin, {interval}, solver='eigen' (eigenbasis solve)",
        _config_rows("kfac.gin", *_INTERVALS, "estimators.full.solver = 'eigen'"),
    )
    optimizers["banded_c10_i100"] = spec(
        f"configs/banded_adafisher.gin (bandwidth 8, block solve), {interval}",
        _config_rows("banded_adafisher.gin", *_INTERVALS),
    )
    optimizers["banded_exact_c10_i100"] = spec(
        f"configs/banded_adafisher.gin (bandwidth 8, exact eigenbasis solve), {interval}",
        _config_rows("banded_adafisher.gin", *_INTERVALS, "estimators.banded.solver = 'eigen'"),
    )
    if asdl_available():
        optimizers["asdl_kfac"] = spec(
            f"ASDL KfacGradientMaker (fisher_emp, damping {KFAC_DAMPING:g} π-split, EMA 0.05) "
            f"+ SGD(lr=1e-3, momentum=0.9), {interval}",
            AsdlKfac,
            models=ASDL_MODELS,
        )
