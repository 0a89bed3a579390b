"""``curvlab check-curvature CONFIG.gin``: native factors vs BackPACK / ASDL, per layer.

For the model and data that CONFIG describes (``train.model``, ``train.data``) and one batch,
the optimizer that CONFIG builds (its adapters and estimator, a researcher's plugin included)
captures its statistics with the native hooks; every available reference backend computes the
same statistics independently; a table gives, per layer, the maximum relative error of ``H``,
``S`` and the un-damped Fisher diagonal ``S ⊗ H`` (``max|x − ref| / max|ref|``), the scaling
convention applied to the reference, and PASS/FAIL against ``--tol``. Exit status 1 on a FAIL.

Fisher types (``--fisher-type``): ``empirical`` (AdaFisher's: gradients of the real labels),
``exact`` (the native side backpropagates every column of the cross-entropy Hessian's square
root, ``√p_c (p − e_c)`` scaled like the loss gradient; BackPACK's KFLR, ASDL's fisher_exact)
and ``mc`` (one label per sample drawn from ``softmax`` with ``--seed``: the same draw BackPACK's
KFAC and ASDL's fisher_mc make with that seed), or ``all``.

    curvlab check-curvature configs/digits_mlp_backpack.gin --fisher-type all
    curvlab check-curvature my.gin --plugin my_estimator.py --bind 'optimizer.estimator="mine"'
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FISHER_TYPES = ("empirical", "exact", "mc")
BACKENDS = ("backpack", "asdl")


@dataclass
class Row:
    """One (layer, backend, Fisher type) comparison."""

    layer: str
    kind: str
    backend: str
    fisher_type: str
    errors: dict[str, float | None] = field(default_factory=dict)
    status: str = "PASS"
    convention: str = ""
    note: str = ""


# -- statistics ----------------------------------------------------------------------------------
def run_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher_type: str,
    seed: int = 0,
    loss_module: nn.Module | None = None,
) -> int:
    """One forward and the backward pass(es) whose output gradients define ``fisher_type``,
    scaled like the gradient of the mean cross-entropy (curvlab's ``g``).

    ``exact``: C backward passes of ``√p_c (p − e_c) / N`` (C = classes), so the hooks see every
    column of the loss-Hessian square root; the statistics' mean over passes is then 1/C of the
    sum (:func:`native_statistics` multiplies ``S`` back). ``mc``: labels drawn with ``seed``.
    With ``loss_module`` (an extended BackPACK loss), the exact/MC columns are left to BackPACK.
    Returns the number of backward passes.
    """
    logits = model(x)
    if fisher_type == "empirical":
        loss_fn = loss_module if loss_module is not None else F.cross_entropy
        loss_fn(logits, y).backward()
        return 1
    if loss_module is not None:  # BackPACK draws / enumerates the columns itself
        loss_module(logits, y).backward()
        return 1
    n, classes = logits.shape
    probs = torch.softmax(logits.detach(), dim=-1)
    if fisher_type == "mc":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            labels = torch.distributions.Categorical(probs=probs).sample()
        F.cross_entropy(logits, labels).backward()
        return 1
    for c in range(classes):
        onehot = torch.zeros_like(probs)
        onehot[:, c] = 1.0
        column = probs[:, c : c + 1].sqrt() * (probs - onehot) / n
        logits.backward(column, retain_graph=c < classes - 1)
    return classes


def take_statistics(layers: Sequence) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean statistics (H, S) of each record, clearing them."""
    out = {}
    for record in layers:
        if record.has_statistics:
            (h, s) = record.take()
            out[record.name] = (h.total / h.count, s.total / s.count)
    return out


def native_statistics(
    layers: Sequence, model: nn.Module, x: Tensor, y: Tensor, fisher_type: str, seed: int = 0
) -> dict[str, tuple[Tensor, Tensor]]:
    """Statistics the native hooks (already attached to ``layers``) capture for ``fisher_type``."""
    for record in layers:
        record.clear()
    passes = run_batch(model, x, y, fisher_type, seed)
    # exact: the mean over the C passes → the sum over the square-root columns
    return {k: (h, s * passes) for k, (h, s) in take_statistics(layers).items()}


def backend_statistics(
    backend_name: str,
    layers: Sequence,
    estimator,  # noqa: ANN001
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher_type: str,
    seed: int = 0,
) -> tuple[dict[str, tuple[Tensor, Tensor]], object]:
    """Statistics a reference backend computes for copies of ``layers`` (the backend is attached
    with ``is_active`` always true and detached afterwards)."""
    from curvlab import registry
    from curvlab.layers import LayerRecord

    records = [
        LayerRecord(
            r.name, r.module, r.adapter, r.params, structure=getattr(r, "structure", "diagonal")
        )
        for r in layers
    ]
    backend = registry.create("backends", backend_name, fisher_type=fisher_type, seed=seed)
    # the reference is the library's own factor of each layer's structure (diagonal or full),
    # whatever estimator the researcher is checking
    uses_full = any(r.structure == "full" for r in records)
    reference = registry.create(
        "estimators",
        "full" if uses_full else "diagonal",
        **({"per_sample": getattr(estimator, "per_sample", True)} if uses_full else {}),
    )
    backend.attach(records, reference, lambda: True, model=model)
    try:
        loss_module = None
        if backend_name == "backpack" and fisher_type != "empirical":
            loss_module = backend.loss_module(nn.CrossEntropyLoss())
        model.zero_grad(set_to_none=True)
        run_batch(model, x, y, fisher_type, seed, loss_module=loss_module)
        backend.collect()
        return take_statistics(records), backend
    finally:
        backend.detach()
        model.zero_grad(set_to_none=True)


def supported(backend_name: str, module: nn.Module, fisher_type: str) -> str | None:
    """Why ``backend_name`` cannot handle ``module`` (``None``: it can)."""
    if backend_name == "backpack":
        from curvlab.plugins.backends.backpack import unsupported_reason

        return unsupported_reason(module, fisher_type)
    from curvlab.plugins.backends.asdl import unsupported_reason

    return unsupported_reason(module)


def available_backends() -> list[str]:
    out = []
    for name, module in (("backpack", "backpack"), ("asdl", "asdl")):
        if importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def relative_error(value: Tensor, reference: Tensor) -> float:
    value, reference = value.double(), reference.double()
    if value.shape != reference.shape:
        return float("inf")
    scale = reference.abs().max().item() if reference.numel() else 0.0
    diff = (value - reference).abs().max().item() if reference.numel() else 0.0
    return diff / scale if scale > 0 else diff


def fisher_diagonal(record, H: Tensor, S: Tensor) -> Tensor | None:  # noqa: ANN001
    """The un-damped S ⊗ H diagonal of every parameter role, flattened (diagonal factors only)."""
    if getattr(record, "structure", "diagonal") != "diagonal":
        return None
    parts = record.adapter.curvature(record.module, H, S)
    return torch.cat([parts[k].reshape(-1) for k in sorted(parts)])


def _comparable(backend_name: str, module: nn.Module) -> tuple[set[str], str]:
    """Which of H, S, F are the same quantity on both sides, and a note for the others."""
    if backend_name == "asdl":
        if isinstance(module, (nn.BatchNorm1d, nn.LayerNorm)):
            return {"S"}, "H,F: ASDL per-parameter diag Σ(x̂s)² vs mean x̂²·mean s²"
        if isinstance(module, nn.BatchNorm2d):
            return set(), "ASDL BN2d diag is per sample (spatial sums), not per row"
        if isinstance(module, nn.Embedding):
            return {"H", "S", "F"}, "H equal iff no token repeats within a sample"
    return {"H", "S", "F"}, ""


def compare(
    model: nn.Module,
    layers: Sequence,
    estimator,  # noqa: ANN001
    x: Tensor,
    y: Tensor,
    fisher_types: Sequence[str] = ("empirical",),
    backends: Sequence[str] | None = None,
    tol: float = 1e-8,
    seed: int = 0,
) -> list[Row]:
    """Native statistics of ``layers`` (with the native backend attached) vs each backend's."""
    from curvlab.plugins.backends import UnsupportedLayerError

    backends = available_backends() if backends is None else list(backends)
    rows: list[Row] = []
    for fisher_type in fisher_types:
        native = native_statistics(layers, model, x, y, fisher_type, seed)
        for name in backends:
            usable, skipped = [], []
            for record in layers:
                reason = supported(name, record.module, fisher_type)
                (skipped if reason else usable).append((record, reason))
            for record, reason in skipped:
                rows.append(
                    Row(
                        record.name,
                        type(record.module).__name__,
                        name,
                        fisher_type,
                        status="n/a",
                        note=f"unsupported: {reason}",
                    )
                )
            if not usable:
                continue
            try:
                reference, backend = backend_statistics(
                    name, [r for r, _ in usable], estimator, model, x, y, fisher_type, seed
                )
            except (UnsupportedLayerError, NotImplementedError) as err:  # a known limitation
                for record, _ in usable:
                    rows.append(
                        Row(
                            record.name,
                            type(record.module).__name__,
                            name,
                            fisher_type,
                            status="n/a",
                            note=f"cannot run this model: {_first_line(err)}",
                        )
                    )
                continue
            except Exception as err:  # noqa: BLE001 - reported in the table, counted as a failure
                for record, _ in usable:
                    rows.append(
                        Row(
                            record.name,
                            type(record.module).__name__,
                            name,
                            fisher_type,
                            status="ERROR",
                            note=f"{type(err).__name__}: {_first_line(err)}",
                        )
                    )
                continue
            for record, _ in usable:
                rows.append(
                    _compare_layer(record, name, fisher_type, native, reference, backend, tol)
                )
    return rows


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _compare_layer(record, name, fisher_type, native, reference, backend, tol) -> Row:  # noqa: ANN001
    row = Row(record.name, type(record.module).__name__, name, fisher_type)
    convention = getattr(backend, "convention", None)
    row.convention = convention(record) if convention else ""
    if record.name not in native or record.name not in reference:
        row.status = "n/a"
        row.note = "no statistics captured (layer not reached by the backward)"
        return row
    (H, S), (H_ref, S_ref) = native[record.name], reference[record.name]
    comparable, row.note = _comparable(name, record.module)
    F_nat, F_ref = fisher_diagonal(record, H, S), fisher_diagonal(record, H_ref, S_ref)
    row.errors = {
        "H": relative_error(H, H_ref),
        "S": relative_error(S, S_ref),
        "F": None if F_nat is None else relative_error(F_nat, F_ref),
    }
    checked = {k: v for k, v in row.errors.items() if k in comparable and v is not None}
    if not checked:
        row.status = "info"
        return row
    row.status = "PASS" if max(checked.values()) <= tol else "FAIL"
    if len(checked) < sum(v is not None for v in row.errors.values()):
        row.status += f"[{','.join(checked)}]"  # only these are the same quantity on both sides
    return row


# -- table ---------------------------------------------------------------------------------------
def format_table(rows: Sequence[Row], tol: float) -> str:
    header = (
        "layer",
        "type",
        "backend",
        "fisher",
        "H err",
        "S err",
        "F=S⊗H err",
        "status",
        "convention / note",
    )
    lines = []
    for r in rows:
        errs = ["-" if r.errors.get(k) is None else f"{r.errors[k]:.1e}" for k in ("H", "S", "F")]
        text = "; ".join(t for t in (r.convention, r.note) if t)
        lines.append((r.layer, r.kind, r.backend, r.fisher_type, *errs, r.status, text))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=False)]
    widths[-1] = 0

    def fmt(cells) -> str:  # noqa: ANN001
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths[:-1]] + ["-" * 20])]
    out += [fmt(line) for line in lines]
    n_fail = sum(r.status.startswith(("FAIL", "ERROR")) for r in rows)
    n_pass = sum(r.status.startswith("PASS") for r in rows)
    out.append(
        f"{n_pass} PASS, {n_fail} FAIL/ERROR, {len(rows) - n_pass - n_fail} not comparable "
        f"(tolerance {tol:g}; relative error = max|native − ref| / max|ref|; PASS[S]: only S is "
        f"the same quantity on both sides, see the note)"
    )
    return "\n".join(out)


# -- CLI -----------------------------------------------------------------------------------------
def load_plugin(spec: str) -> None:
    """Import a plugin file (``path/to/plugin.py``) or module (``pkg.module``) so it registers."""
    if spec.endswith(".py") or Path(spec).is_file():
        path = Path(spec).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--plugin {spec}: no such file ({path})")
        name = f"curvlab_user_plugin_{path.stem}"
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import plugin file {spec!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a .gin file with train.model, train.data and the optimizer")
    p.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra gin binding (repeatable)",
    )
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE_OR_MODULE",
        help="import a plugin (e.g. your estimator) before parsing the config (repeatable)",
    )
    p.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        default=None,
        help="reference backend(s) (default: every installed one)",
    )
    p.add_argument(
        "--fisher-type",
        choices=FISHER_TYPES + ("all",),
        default="empirical",
        help="empirical (AdaFisher's, default), exact, mc, or all",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="relative tolerance (default 1e-8 float64, 1e-4 float32)",
    )
    p.add_argument("--seed", type=int, default=0, help="batch selection and MC labels")


def _query(name: str, default):  # noqa: ANN001, ANN202
    import gin

    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def _evaluate(reference) -> object:  # noqa: ANN001
    return (
        reference.scoped_configurable_fn()
        if hasattr(reference, "scoped_configurable_fn")
        else reference()
    )


def setup(
    config: str, bindings: Sequence[str], batch_size: int | None, dtype: torch.dtype, seed: int
) -> tuple[nn.Module, Tensor, Tensor, object]:
    """Model, one batch and the natively attached optimizer that ``config`` describes."""
    from curvlab.config import make_optimizer, parse_config
    from curvlab.experiments import train as _train  # noqa: F401 - registers train.*, models, data

    parse_config(config, list(bindings) + ['optimizer.backend = "native"'])
    model_ref, data_ref = _query("train.model", None), _query("train.data", None)
    if model_ref is None or data_ref is None:
        raise ValueError(f"{config}: check-curvature needs train.model and train.data bindings")
    batch_size = batch_size or int(_query("train.batch_size", 64))
    torch.manual_seed(seed)
    model = _evaluate(model_ref).to(dtype)
    model.train()
    split = _evaluate(data_ref)
    order = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))
    idx = order[:batch_size]
    x, y = split.x_train[idx], split.y_train[idx]
    x = x.to(dtype) if x.is_floating_point() else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(model)
    return model, x, y, opt


def main(args: argparse.Namespace) -> int:
    from curvlab.validation import check_positive_int, check_range

    if args.batch_size is not None:
        check_positive_int("--batch-size", args.batch_size)
    if args.tol is not None:
        check_range("--tol", args.tol, 0.0, low_inclusive=False)
    for spec in args.plugin:
        load_plugin(spec)
    dtype = getattr(torch, args.dtype)
    tol = args.tol if args.tol is not None else (1e-8 if dtype == torch.float64 else 1e-4)
    fisher_types = FISHER_TYPES if args.fisher_type == "all" else (args.fisher_type,)
    model, x, y, opt = setup(args.config, args.bind, args.batch_size, dtype, args.seed)
    backends = args.backend or available_backends()
    print(
        f"check-curvature: {args.config}  batch {len(x)}  {args.dtype}  estimator "
        f"{opt.estimator!r}  backends {', '.join(backends) or 'none installed'}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = compare(
            model, opt.layers, opt.estimator, x, y, fisher_types, backends, tol, args.seed
        )
    opt.backend.detach()
    print(format_table(rows, tol))
    return 1 if any(r.status.startswith(("FAIL", "ERROR")) for r in rows) else 0


def _cli(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - python -m entry
    parser = argparse.ArgumentParser(prog="curvlab check-curvature")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_cli())

__all__ = ["compare", "format_table", "main", "native_statistics", "run_batch"]
