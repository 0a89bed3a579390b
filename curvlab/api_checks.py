"""Checks of how the optimizer is used (kept out of the step and the assembly).

Each guards against a misuse that used to train wrongly or fail far from its cause:
complex parameters, a parameter listed twice, parameters that belong to another model, and
training with the model in eval mode (nothing is captured).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn


class CurvatureNotCapturedWarning(UserWarning):
    """``step()`` found gradients but the model's layers captured nothing (eval mode)."""


def parameter_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def check_new_parameters(param_group: dict[str, Any], model: nn.Module, index: int) -> None:
    """Reject what would be trained wrongly: complex parameters (the curvature is defined for
    real ones) and a parameter listed twice in one group (it would be updated twice).
    Materialises ``param_group["params"]`` as a list (it may be a generator)."""
    params = param_group["params"]
    if isinstance(params, set):
        return  # torch.optim rejects sets (their order is not reproducible)
    params = [params] if isinstance(params, Tensor) else list(params)
    param_group["params"] = params
    names = parameter_names(model)
    seen: set[int] = set()
    for i, p in enumerate(params):
        name = names.get(id(p), f"params[{i}] (not a parameter of the model)")
        if isinstance(p, Tensor) and p.is_complex():
            raise ValueError(
                f"parameter {name} of param group {index} is complex ({p.dtype}): curvlab "
                f"optimizers train real floating-point parameters only (view it as real with "
                f"torch.view_as_real and a real nn.Parameter)"
            )
        if id(p) in seen:
            raise ValueError(
                f"parameter {name} is listed twice in param group {index}: it would be updated "
                f"twice per step; pass each parameter once"
            )
        seen.add(id(p))


def check_parameters_belong_to(model: nn.Module, params: list[Tensor]) -> None:
    """Explain a model without hooked layers that is really a parameter mismatch."""
    own = set(parameter_names(model))
    foreign = [p for p in params if id(p) not in own]
    if foreign and len(foreign) == len(params):
        shapes = ", ".join(str(list(p.shape)) for p in foreign[:5])
        raise ValueError(
            f"none of the {len(params)} parameters given to the optimizer belong to `model` "
            f"{type(model).__name__} (shapes {shapes}{', ...' if len(foreign) > 5 else ''}): "
            f"pass the model whose parameters are trained (its layers are hooked for curvature)"
        )


def warn_if_nothing_captured(opt: Any, grads: list[Tensor]) -> None:
    """Once: a curvature step with gradients but no statistics because the layers were in
    eval mode (``model.eval()`` during the training forward)."""
    if opt._warned_not_training or not grads or not opt.layers:
        return
    if any(r.has_statistics for r in opt.layers) or any(r.module.training for r in opt.layers):
        return
    opt._warned_not_training = True
    warnings.warn(
        "step() got gradients, but no layer captured curvature statistics: the model is in eval "
        "mode (model.eval()), where curvlab captures nothing; call model.train() before the "
        "training forward (the step uses the factors as they were)",
        CurvatureNotCapturedWarning,
        stacklevel=3,
    )
