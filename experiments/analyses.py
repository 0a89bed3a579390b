"""``curvlab analyze NAME``: the paper's curvature analyses as commands (figures + JSON).

    curvlab analyze diagonal-concentration [--out DIR] [--steps N] [--seed S] [--quiet]
    curvlab analyze diagonal-accuracy      ...
    curvlab analyze trajectories           ...
    curvlab analyze curvature-range        ...
    curvlab analyze all                    (each one into DIR/NAME)
    curvlab analyze NAME --set KEY=VALUE   (any other keyword of the analysis function)

Every analysis writes PNG figures (matplotlib, Agg backend) and one ``results.json`` into its
output directory (default ``runs/analyses/NAME``) and shows a progress bar (``--quiet``: none,
and only the summary lines are printed). They run with one intra-op thread (``--threads``).
Definitions, scalings and measured numbers are in ``docs/results/analyses.md``.

* ``diagonal-concentration`` (thesis Sec. 3.2): the digits CNN trained with AdaFisher while a
  second, learning-rate-0 :class:`~curvlab.CurvatureOptimizer` with the ``full`` estimator on the
  same model keeps EMA full Kronecker factors ``A = E[ā āᵀ]``, ``G = E[g̃ g̃ᵀ]`` of every
  Linear/Conv2d layer. At checkpoints, per factor: the fraction of Frobenius energy on the
  diagonal, Gershgorin discs vs eigenvalues, the eigenvalue shift under symmetric off-diagonal
  Gaussian noise (σ = 1e-3, on the factor scaled to mean diagonal 1), and a diagonal/off-diagonal
  SNR.
* ``diagonal-accuracy`` (thesis Fig. 6.2 D): the mean absolute error between curvlab's
  Kronecker-factored Fisher diagonal ``N²·L·(S ⊗ H)`` (raw factors, before min-max) and the Fisher
  diagonal BackPACK computes (``DiagGGNExact``, ``DiagGGNMC``; plus the empirical Fisher diagonal
  from ``SumGradSquared``), per layer over training, for a CNN without BatchNorm on digits.
* ``trajectories`` (paper Appendix B): iris reduced to 2 features by PCA, a 2-2-3 tanh MLP
  trained full-batch from one initialisation with AdaFisher, Adam, K-FAC (``configs/kfac.gin``)
  and SGD; the input weights of the first hidden unit, ``W1[0, 0]`` and ``W1[0, 1]``, drawn over
  the loss surface in those two coordinates.
* ``curvature-range``: the distribution of ``F/λ`` (``opt.preconditioner(p) / λ``) over training
  for the paper and the official variant on the digits CNN.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.experiments.data import digits, iris
from curvlab.experiments.models import DigitsCNN

DEFAULT_OUT = Path("runs") / "analyses"
SIGMA = 1e-3


# -- shared helpers -------------------------------------------------------------------------------
def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _progress(total: int, desc: str, quiet: bool):  # noqa: ANN202
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=False)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (restored afterwards); ``None`` leaves torch's setting."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: tensors to lists/floats, non-finite floats to None."""
    if isinstance(obj, Tensor):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.8g}") if math.isfinite(obj) else None
    return obj


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with one key per line but lists of numbers on one line (long series stay small)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dumps(v, indent + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        items = [inner + _dumps(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON (floats to 8 significant digits, non-finite ones as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(_clean(obj)) + "\n", encoding="utf-8")


def batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless shuffled index batches, a new permutation every epoch; incomplete last batches
    are dropped so that every batch has ``batch_size`` samples (the per-sample scaling N)."""
    generator = torch.Generator().manual_seed(seed)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training samples")
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """``count`` checkpoints after steps 1 … ``steps`` (the first and the last included)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    points = {1, steps}
    for k in range(1, count - 1):
        points.add(max(1, round(k * steps / (count - 1))))
    return sorted(points)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).double().mean().item()
    model.train(was)
    return acc


def kronecker_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Linear and Conv2d layers by name (the layers with full Kronecker factors)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


# -- 1. diagonal concentration --------------------------------------------------------------------
def concentration_metrics(
    M: Tensor, sigma: float = SIGMA, draws: int = 5, generator: torch.Generator | None = None
) -> dict[str, Any]:
    r"""How diagonal a symmetric PSD factor ``M`` (d × d) is.

    * ``energy_fraction`` = ‖diag M‖²_F / ‖M‖²_F ∈ [0, 1];
    * ``snr`` = mean_i M_ii² / mean_{i≠j} M_ij² (``snr_db`` = 10 log10 of it; ``inf`` for a
      diagonal M); energy fraction = d·snr / (d·snr + d(d−1)) ties the two together;
    * Gershgorin discs of ``M̄ = M / (tr M / d)`` (mean diagonal 1): centres ``M̄_ii``, radii
      ``R_i = Σ_{j≠i} |M̄_ij|``; ``dominant_rows`` = fraction of rows with ``R_i < M̄_ii``;
    * eigenvalue shift under noise: ``E`` symmetric with zero diagonal and ``E_ij = E_ji ~
      N(0, σ²)`` (i < j); ``shift`` = max_i |λ_i(M̄ + E) − λ_i(M̄)| (sorted spectra), mean over
      ``draws``; ``relative_shift`` = shift / λ_max(M̄); ``weyl_bound`` = mean ‖E‖₂ (Weyl's
      inequality bounds every shift by it). ``shift_raw`` / ``relative_shift_raw``: the same
      noise added to ``M`` as stored.
    """
    M = M.double()
    M = 0.5 * (M + M.T)
    d = M.shape[0]
    diag = torch.diagonal(M)
    off = M - torch.diag(diag)
    total = (M**2).sum().item()
    energy = (diag**2).sum().item() / total if total > 0 else 1.0
    mean_diag2 = (diag**2).mean().item()
    mean_off2 = (off**2).sum().item() / (d * (d - 1)) if d > 1 else 0.0
    snr = mean_diag2 / mean_off2 if mean_off2 > 0 else math.inf
    mean_abs_ratio = (
        diag.abs().mean().item() / (off.abs().sum().item() / (d * (d - 1)))
        if d > 1 and off.abs().sum() > 0
        else math.inf
    )
    scale = diag.mean().item()
    Mn = M / scale if scale > 0 else M
    centres = torch.diagonal(Mn)
    radii = (Mn - torch.diag(centres)).abs().sum(1)
    eig = torch.linalg.eigvalsh(Mn)
    eig_raw = torch.linalg.eigvalsh(M)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    shifts, shifts_raw, norms = [], [], []
    for _ in range(draws):
        E = torch.randn(d, d, generator=generator, dtype=torch.float64) * sigma
        E = torch.triu(E, 1)
        E = E + E.T
        shifts.append((torch.linalg.eigvalsh(Mn + E) - eig).abs().max().item())
        shifts_raw.append((torch.linalg.eigvalsh(M + E) - eig_raw).abs().max().item())
        norms.append(torch.linalg.matrix_norm(E, 2).item() if d > 1 else 0.0)
    lam_max = eig.abs().max().item()
    lam_max_raw = eig_raw.abs().max().item()
    return dict(
        dim=d,
        energy_fraction=energy,
        snr=snr,
        snr_db=10 * math.log10(snr) if 0 < snr < math.inf else (math.inf if snr else -math.inf),
        mean_abs_diag_over_offdiag=mean_abs_ratio,
        dominant_rows=(radii < centres).double().mean().item(),
        median_radius_over_centre=(radii / centres.clamp_min(1e-300)).median().item(),
        shift=sum(shifts) / draws,
        shift_max=max(shifts),
        relative_shift=sum(shifts) / draws / lam_max if lam_max > 0 else math.inf,
        weyl_bound=sum(norms) / draws,
        shift_raw=sum(shifts_raw) / draws,
        relative_shift_raw=sum(shifts_raw) / draws / lam_max_raw if lam_max_raw > 0 else math.inf,
        trace_over_dim=scale,
        eig_min=eig.min().item(),
        eig_max=eig.max().item(),
        gershgorin=dict(centres=centres, radii=radii, eigenvalues=eig),
    )


def centred_covariance(A: Tensor) -> Tensor:
    """``Cov[a] = E[a aᵀ] − μ μᵀ`` from a K-FAC input factor whose last entry is the bias's 1
    (so ``A[-1, :-1] = μ = E[a]``); the bias row and column are dropped."""
    mu = A[-1, :-1]
    return A[:-1, :-1] - mu[:, None] * mu[None, :]


def _plot_gershgorin(path: Path, step: int, factors: dict[str, dict[str, Tensor]]) -> None:
    plt = _pyplot()
    names = list(factors)
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 2.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, key in enumerate(("A", "G")):
            ax = axes[row][col]
            g = factors[name][key]
            centres, radii, eig = (t.double() for t in (g["centres"], g["radii"], g["eigenvalues"]))
            order = torch.argsort(centres)
            d = len(centres)
            y = torch.arange(d, dtype=torch.float64)
            ax.hlines(y, (centres - radii)[order], (centres + radii)[order], color="tab:blue",
                      lw=1.0 if d < 80 else 0.5, alpha=0.7, label="Gershgorin disc (interval)")
            ax.plot(centres[order], y, "|", color="tab:blue", ms=3)
            ax.plot(eig, torch.full_like(eig, -0.04 * d - 1), "v", color="tab:red", ms=4,
                    label="eigenvalues")
            ax.axvline(0.0, color="0.6", lw=0.5)
            ax.set_title(f"layer {name}: {key} ({d}×{d}), step {step}", fontsize=9)
            ax.set_ylabel("row (sorted by centre)", fontsize=8)
            ax.set_xlabel("value (factor / mean diagonal)", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_factor_heatmaps(path: Path, step: int, mats: dict[str, dict[str, Tensor]]) -> None:
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    names = list(mats)
    fig, axes = plt.subplots(2, len(names), figsize=(3.4 * len(names), 6.4), squeeze=False)
    for col, name in enumerate(names):
        for row, key in enumerate(("A", "G")):
            ax = axes[row][col]
            M = mats[name][key].double().abs()
            M = M / M.max()
            im = ax.imshow(M.clamp_min(1e-6).numpy(), norm=LogNorm(vmin=1e-4, vmax=1.0),
                           cmap="viridis", interpolation="nearest")
            ax.set_title(f"|{key}| layer {name} ({M.shape[0]}×{M.shape[0]})", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="|entry| / max |entry|")
    fig.suptitle(f"full Kronecker factors (EMA), step {step}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_concentration_curves(path: Path, rows: list[dict], names: list[str]) -> None:
    plt = _pyplot()
    metrics = (
        ("energy_fraction", "diagonal energy fraction", False),
        ("snr", "SNR = mean diag² / mean off-diag²", True),
        ("relative_shift", f"eigenvalue shift / λ_max (σ = {SIGMA:g})", True),
    )
    fig, axes = plt.subplots(1, len(metrics), figsize=(15, 4))
    steps = [r["step"] for r in rows]
    for ax, (key, title, log) in zip(axes, metrics):
        for i, name in enumerate(names):
            for factor, style in (("A", "-o"), ("G", "--s"), ("A_cov", ":^")):
                if factor not in rows[0]["layers"][name]:
                    continue
                values = [r["layers"][name][factor][key] for r in rows]
                ax.plot(steps, values, style, ms=4, color=f"C{i}", label=f"{name} {factor}")
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diagonal_concentration(
    out: Path,
    steps: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    width: int = 8,
    batch_size: int = 64,
    epochs: int = 10,
    checkpoints: int = 4,
    sigma: float = SIGMA,
    noise_draws: int = 5,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """Train the digits CNN with AdaFisher and analyse the EMA full Kronecker factors that a
    learning-rate-0 ``full``-estimator optimizer on the same model keeps (module docstring)."""
    import curvlab

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = digits()
    if steps is None:
        steps = epochs * (len(data.x_train) // batch_size)
    model = DigitsCNN(width)
    opt = curvlab.AdaFisher(model, lr=lr)
    # same model, lr = 0: only folds full factors into its EMA (γ as AdaFisher's), never moves θ
    shadow = curvlab.CurvatureOptimizer(
        model, lr=0.0, gamma=opt.gamma, estimator="full", normalizer="identity",
        inverse_interval=10**9, warn_on_fallback=False, exclusive=False,
    )
    layers = kronecker_layers(model)
    ckpts = checkpoint_steps(steps, checkpoints)
    generator = torch.Generator().manual_seed(seed + 1)
    rows, last_loss = [], math.nan
    index = batches(len(data.x_train), batch_size, seed)
    bar = _progress(steps, "diagonal-concentration", quiet)
    for step in range(1, steps + 1):
        idx = next(index)
        opt.zero_grad()
        shadow.zero_grad()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        shadow.step()
        opt.step()
        last_loss = loss.item()
        bar.update()
        bar.set_postfix(loss=f"{last_loss:.3f}")
        if step not in ckpts:
            continue
        row = dict(step=step, train_loss=last_loss,
                   test_accuracy=accuracy(model, data.x_test, data.y_test), layers={})
        mats = {}
        for name, module in layers.items():
            state = shadow.curvature_state[name]
            A, G = state["H"][0], state["S"][0]  # (groups, d, d); the digits CNN has groups = 1
            mats[name] = {"A": A, "G": G}
            row["layers"][name] = {
                "type": type(module).__name__,
                "A": concentration_metrics(A, sigma, noise_draws, generator),
                "G": concentration_metrics(G, sigma, noise_draws, generator),
            }
            if module.bias is not None:  # ā ends with a 1: A's last row holds the input means
                row["layers"][name]["A_cov"] = concentration_metrics(
                    centred_covariance(A), sigma, noise_draws, generator
                )
        _plot_gershgorin(out / f"gershgorin_step{step}.png", step,
                         {n: {k: row["layers"][n][k]["gershgorin"] for k in ("A", "G")}
                          for n in layers})
        if step == ckpts[-1]:
            _plot_factor_heatmaps(out / "factors_final.png", step, mats)
        rows.append(row)
    bar.close()
    names = list(layers)
    _plot_concentration_curves(out / "concentration.png", rows, names)
    keys = ("dim", "energy_fraction", "snr", "snr_db", "mean_abs_diag_over_offdiag",
            "dominant_rows", "median_radius_over_centre", "shift", "relative_shift",
            "weyl_bound", "shift_raw", "relative_shift_raw")
    final = rows[-1]
    factors = ("A", "G", "A_cov")
    summary = {
        name: {f: {k: final["layers"][name][f][k] for k in keys}
               for f in factors if f in final["layers"][name]}
        for name in names
    }
    for row in rows:  # Gershgorin vectors are in the figures; keep the JSON small
        for name in names:
            for f in factors:
                if f in row["layers"][name]:
                    row["layers"][name][f].pop("gershgorin")
    result = dict(
        analysis="diagonal-concentration",
        config=dict(model=f"DigitsCNN(width={width})", optimizer=f"AdaFisher(lr={lr})",
                    factors="EMA (γ = 0.8) of full K-FAC factors, per_sample=True",
                    steps=steps, batch_size=batch_size, seed=seed, sigma=sigma,
                    noise_draws=noise_draws, checkpoints=ckpts),
        final_step=final["step"], final_test_accuracy=final["test_accuracy"],
        final=summary, checkpoints=rows,
        figures=["concentration.png", "factors_final.png",
                 *(f"gershgorin_step{k}.png" for k in ckpts)],
    )
    write_json(out / "results.json", result)
    return result


# -- 2. accuracy of the diagonal ------------------------------------------------------------------
class PlainCNN(nn.Sequential):
    """The digits CNN without BatchNorm (BackPACK's DiagGGN needs no train-mode BatchNorm)."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 16, num_classes),
        )


def _output_positions(model: nn.Module, x: Tensor) -> dict[str, int]:
    """L per Linear/Conv2d layer for input ``x`` (1 for Linear on 2-D input)."""
    sizes, handles = {}, []
    for name, module in kronecker_layers(model).items():
        def hook(mod, inputs, output, name=name):  # noqa: ANN001
            sizes[name] = output.shape[2] * output.shape[3] if output.dim() == 4 else (
                output.numel() // output.shape[0] // output.shape[-1])
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return sizes


def kronecker_diagonal(
    module: nn.Module, H: Tensor, S: Tensor, batch: int, positions: int
) -> dict[str, Tensor]:
    r"""Per-sample Kronecker-factored Fisher diagonal from curvlab's raw diagonal factors.

    ``F[o, i] = N² · L · S[o] · H[i]`` (the bias uses H's last entry, which is 1): ``S`` is a
    mean of ``g²`` with ``g`` carrying the ``1/N`` of a mean-reduced loss, so ``N² S`` is the
    per-sample ``E[g̃²]``; for a convolution the weight gradient of one sample sums over the
    ``L`` output positions, and K-FAC's "expand" approximation of ``E_n[(Σ_t ā_t g̃_t)²]`` is
    ``L · E_{n,t}[ā²] · E_{n,t}[g̃²]``. For a Linear layer and one sample it is exact.
    """
    H = H.reshape(-1) if H.dim() > 1 else H  # conv: (groups = 1, d)
    full = (S[:, None] * H[None, :]) * (batch**2 * positions)
    n_w = module.weight[0].numel()
    out = {"weight": full[:, :n_w].reshape(module.weight.shape)}
    if module.bias is not None:
        out["bias"] = full[:, n_w]
    return out


def curvlab_fisher_diagonal(
    model_fn: Callable[[], nn.Module], state: dict, x: Tensor, y: Tensor
) -> dict[str, dict[str, Tensor]]:
    """curvlab's Kronecker-factored Fisher diagonal of a model (given by its state) on one batch:
    a fresh copy, a ``CurvatureOptimizer`` with lr = 0 and γ = 0 (so ``H = Ĥ``, ``S = Ŝ`` of this
    batch), one forward/backward of the mean cross-entropy, one ``step()``; then
    :func:`kronecker_diagonal` per Linear/Conv2d layer."""
    import curvlab

    probe = model_fn()
    probe.load_state_dict(state)
    opt = curvlab.CurvatureOptimizer(probe, lr=0.0, gamma=0.0, adapters=["linear", "conv2d"],
                                     warn_on_fallback=False)
    F.cross_entropy(probe(x), y).backward()
    opt.step()
    L = _output_positions(probe, x)
    return {
        name: kronecker_diagonal(m, opt.curvature_state[name]["H"],
                                 opt.curvature_state[name]["S"], len(x), L[name])
        for name, m in kronecker_layers(probe).items()
    }


def backpack_fisher_diagonals(
    model_fn: Callable[[], nn.Module], state: dict, x: Tensor, y: Tensor, mc_seed: int = 0
) -> dict[str, dict[str, dict[str, Tensor]]]:
    """Fisher diagonals from BackPACK on a fresh, extended copy, per-sample average scale:
    ``exact`` = DiagGGNExact, ``mc`` = DiagGGNMC (1 sample, labels drawn with ``mc_seed`` in a
    forked RNG), ``empirical`` = N · SumGradSquared (mean of squared per-sample gradients).
    Returns reference → layer → role → tensor."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC, SumGradSquared

    model = model_fn()
    model.load_state_dict(state)
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        torch.manual_seed(mc_seed)
        with backpack(DiagGGNExact(), DiagGGNMC(mc_samples=1), SumGradSquared()):
            loss_fn(model(x), y).backward()
    out: dict[str, dict[str, dict[str, Tensor]]] = {"exact": {}, "mc": {}, "empirical": {}}
    for name, module in kronecker_layers(model).items():
        for ref in out:
            out[ref][name] = {}
        for role in ("weight", "bias"):
            p = getattr(module, role, None)
            if p is None:
                continue
            out["exact"][name][role] = p.diag_ggn_exact.detach()
            out["mc"][name][role] = p.diag_ggn_mc.detach()
            out["empirical"][name][role] = p.sum_grad_squared.detach() * len(x)
    return out


def _flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([d[k].reshape(-1) for k in ("weight", "bias") if k in d])


def mae(approx: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    a, r = _flat(approx).double(), _flat(ref).double()
    err = (a - r).abs().mean().item()
    scale = r.abs().mean().item()
    return dict(mae=err, relative_mae=err / scale if scale > 0 else math.inf, mean_ref=scale,
                mean_approx=a.abs().mean().item())


def _plot_accuracy_curves(path: Path, rows: list[dict], names: list[str]) -> None:
    plt = _pyplot()
    refs = (("exact", "DiagGGNExact"), ("mc", "DiagGGNMC"), ("empirical", "empirical (BackPACK)"))
    fig, axes = plt.subplots(2, len(refs), figsize=(15, 7.5), sharex=True)
    steps = [r["step"] for r in rows]
    colors = dict(zip(names, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for col, (ref, title) in enumerate(refs):
        for row_i, key in enumerate(("mae", "relative_mae")):
            ax = axes[row_i][col]
            for name in names:
                ax.plot(steps, [r["layers"][name]["batch"][ref][key] for r in rows], "-o",
                        ms=3, color=colors[name], label=f"layer {name}: same batch")
                ax.plot(steps, [r["layers"][name]["ema"][ref][key] for r in rows], "--",
                        color=colors[name], alpha=0.7, label=f"layer {name}: optimizer EMA")
                other = {"exact": "empirical_vs_exact", "mc": "mc_vs_exact"}.get(ref)
                if other:
                    ax.plot(steps, [r["layers"][name][other][key] for r in rows], ":",
                            color=colors[name], alpha=0.9,
                            label=f"layer {name}: BackPACK {other.replace('_vs_', ' vs ')}")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.set_title(f"curvlab S⊗H vs {title}", fontsize=10)
            ax.set_ylabel("MAE" if key == "mae" else "MAE / mean |reference|")
            if row_i == 1:
                ax.set_xlabel("training step")
    axes[0][0].legend(fontsize=6)
    axes[0][1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accuracy_scatter(path: Path, step: int, approx: dict, refs: dict) -> None:
    plt = _pyplot()
    names = list(approx)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        a = _flat(approx[name]).double()
        lo, hi = math.inf, 0.0
        for ref, color in (("exact", "tab:blue"), ("empirical", "tab:orange")):
            r = _flat(refs[ref][name]).double()
            keep = (r > 0) & (a > 0)  # dead units (zero curvature) have no place on log axes
            ax.loglog(r[keep], a[keep], ".", ms=2, color=color, alpha=0.5, label=f"vs {ref}")
            if keep.any():
                lo = min(lo, r[keep].min().item(), a[keep].min().item())
                hi = max(hi, r[keep].max().item(), a[keep].max().item())
        lo = lo if math.isfinite(lo) else 1e-12
        hi = hi if hi > lo else lo * 10
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.set_xlabel("reference Fisher diagonal (BackPACK)")
        ax.set_ylabel("curvlab N²·L·S⊗H")
        ax.set_title(f"layer {name}, step {step}", fontsize=10)
        ax.legend(fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diagonal_accuracy(
    out: Path,
    steps: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    width: int = 8,
    batch_size: int = 64,
    eval_batch: int = 256,
    epochs: int = 10,
    checkpoints: int = 11,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """MAE between curvlab's Kronecker-factored Fisher diagonal and BackPACK's Fisher diagonals
    per layer over AdaFisher training of :class:`PlainCNN` on digits (module docstring)."""
    import curvlab

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = digits()
    if steps is None:
        steps = epochs * (len(data.x_train) // batch_size)

    def model_fn() -> nn.Module:
        return PlainCNN(width)

    model = model_fn()
    opt = curvlab.AdaFisher(model, lr=lr)
    layers = kronecker_layers(model)
    L = _output_positions(model, data.x_train)
    pick = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed + 7))
    xe, ye = data.x_train[pick[:eval_batch]], data.y_train[pick[:eval_batch]]
    ckpts = [0, *checkpoint_steps(steps, checkpoints - 1)] if checkpoints > 1 else [steps]
    index = batches(len(data.x_train), batch_size, seed)
    rows: list[dict] = []
    last_loss = math.nan

    def measure(step: int) -> tuple[dict, dict]:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        approx = curvlab_fisher_diagonal(model_fn, state, xe, ye)
        refs = backpack_fisher_diagonals(model_fn, state, xe, ye, mc_seed=seed * 100_003 + step)
        row = dict(step=step, train_loss=last_loss,
                   test_accuracy=accuracy(model, data.x_test, data.y_test), layers={})
        for name, module in layers.items():
            entry = {"type": type(module).__name__, "positions": L[name],
                     "batch": {ref: mae(approx[name], refs[ref][name]) for ref in refs}}
            entry["mc_vs_exact"] = mae(refs["mc"][name], refs["exact"][name])
            entry["empirical_vs_exact"] = mae(refs["empirical"][name], refs["exact"][name])
            state_l = opt.curvature_state.get(name)
            if state_l is not None:  # the optimizer's EMA (raw, before min-max), training N
                ema = kronecker_diagonal(module, state_l["H"], state_l["S"], batch_size, L[name])
                entry["ema"] = {ref: mae(ema, refs[ref][name]) for ref in refs}
            else:
                entry["ema"] = {ref: dict(mae=math.nan, relative_mae=math.nan) for ref in refs}
            row["layers"][name] = entry
        rows.append(row)
        return approx, refs

    bar = _progress(steps, "diagonal-accuracy", quiet)
    if 0 in ckpts:
        measure(0)
    approx = refs = None
    for step in range(1, steps + 1):
        idx = next(index)
        opt.zero_grad()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        last_loss = loss.item()
        bar.update()
        bar.set_postfix(loss=f"{last_loss:.3f}")
        if step in ckpts:
            approx, refs = measure(step)
    bar.close()
    names = list(layers)
    _plot_accuracy_curves(out / "mae_over_training.png", rows, names)
    _plot_accuracy_scatter(out / "diagonal_scatter_final.png", steps, approx, refs)
    final = rows[-1]
    summary = {
        name: {
            "batch": {r: final["layers"][name]["batch"][r] for r in ("exact", "mc", "empirical")},
            "ema": {r: final["layers"][name]["ema"][r] for r in ("exact", "mc", "empirical")},
            "mc_vs_exact": final["layers"][name]["mc_vs_exact"],
            "empirical_vs_exact": final["layers"][name]["empirical_vs_exact"],
        }
        for name in names
    }
    over_training = {
        name: {
            ref: dict(
                mean_relative_mae=sum(r["layers"][name]["batch"][ref]["relative_mae"]
                                      for r in rows) / len(rows),
                max_relative_mae=max(r["layers"][name]["batch"][ref]["relative_mae"]
                                     for r in rows),
            )
            for ref in ("exact", "mc", "empirical")
        }
        for name in names
    }
    result = dict(
        analysis="diagonal-accuracy",
        config=dict(model=f"PlainCNN(width={width}) (the digits CNN without BatchNorm)",
                    optimizer=f"AdaFisher(lr={lr})", steps=steps, batch_size=batch_size,
                    eval_batch=eval_batch, seed=seed, checkpoints=ckpts,
                    scaling="F[o,i] = N^2 * L * S[o] * H[i] (per-sample average scale)",
                    layers={n: dict(type=type(m).__name__, positions=L[n])
                            for n, m in layers.items()}),
        final_step=final["step"], final_test_accuracy=final["test_accuracy"],
        final=summary, over_training=over_training, checkpoints=rows,
        figures=["mae_over_training.png", "diagonal_scatter_final.png"],
    )
    write_json(out / "results.json", result)
    return result


# -- 3. trajectories on iris ----------------------------------------------------------------------
class IrisMLP(nn.Sequential):
    """2 → 2 (tanh) → 3: two features, two hidden units, three classes."""

    def __init__(self, hidden: int = 2) -> None:
        super().__init__(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 3))


#: optimizer → learning rate (full batch); SGD and K-FAC use momentum 0.9 (K-FAC: kfac.gin's β)
TRAJECTORY_LR = {"AdaFisher": 1e-3, "Adam": 3e-2, "K-FAC": 1e-2, "SGD": 0.1}


def _make_trajectory_optimizer(name: str, model: nn.Module, lr: float):  # noqa: ANN202
    import gin

    import curvlab

    if name == "AdaFisher":
        return curvlab.AdaFisher(model, lr=lr)
    if name == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "K-FAC":
        try:
            return curvlab.build_optimizer(model, "kfac.gin", bindings=[f"optimizer.lr = {lr!r}"])
        finally:
            gin.clear_config()
    raise ValueError(f"unknown optimizer {name!r}")


def loss_surface(
    model: nn.Module, x: Tensor, y: Tensor, a: Tensor, b: Tensor
) -> Tensor:
    """Mean cross-entropy of :class:`IrisMLP` with ``W1[0,0] = a_i``, ``W1[0,1] = b_j`` and every
    other parameter as in ``model``: a (len(b), len(a)) grid, computed in one batched pass."""
    W1, b1 = model[0].weight.detach().double(), model[0].bias.detach().double()
    W2, b2 = model[2].weight.detach().double(), model[2].bias.detach().double()
    B, A = torch.meshgrid(b.double(), a.double(), indexing="ij")
    W = W1.expand(A.numel(), *W1.shape).clone()
    W[:, 0, 0], W[:, 0, 1] = A.reshape(-1), B.reshape(-1)
    h = torch.tanh(torch.einsum("nd,gkd->gnk", x.double(), W) + b1)
    logits = h @ W2.T + b2
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.repeat(A.numel()), reduction="none"
    ).reshape(A.numel(), -1).mean(1)
    return losses.reshape(A.shape)


def _plot_trajectories(path: Path, runs: dict[str, dict], surfaces: dict[str, tuple]) -> None:
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    names = list(runs)
    fig, axes = plt.subplots(2, 2, figsize=(11, 9.5))
    for ax, name in zip(axes.flat, names):
        a, b, Z = surfaces[name]
        Zc = Z.clamp_min(1e-3).numpy()
        levels = torch.logspace(math.log10(Zc.min()), math.log10(Zc.max()), 25).numpy()
        cs = ax.contourf(a.numpy(), b.numpy(), Zc, levels=levels, norm=LogNorm(), cmap="viridis",
                         extend="both")
        ax.contour(a.numpy(), b.numpy(), Zc, levels=levels, colors="k", linewidths=0.3,
                   alpha=0.4)
        path_ = torch.tensor(runs[name]["path"])
        ax.plot(path_[:, 0], path_[:, 1], "-", color="white", lw=1.6)
        ax.plot(path_[:, 0], path_[:, 1], ".", color="tab:red", ms=2)
        ax.plot(path_[0, 0], path_[0, 1], "o", color="white", mec="k", ms=8, label="start")
        ax.plot(path_[-1, 0], path_[-1, 1], "*", color="tab:red", mec="k", ms=14, label="end")
        r = runs[name]
        ax.set_title(f"{name} (lr {r['lr']:g}): loss {r['final_train_loss']:.3f}, "
                     f"test acc {r['test_accuracy']:.2f}", fontsize=10)
        ax.set_xlabel("W1[0, 0]")
        ax.set_ylabel("W1[0, 1]")
        fig.colorbar(cs, ax=ax, label="training loss (others at the final point)", format="%.2g")
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_trajectory_overlay(path: Path, runs: dict[str, dict]) -> None:
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = dict(zip(runs, ("tab:red", "tab:blue", "tab:green", "tab:orange")))
    for name, r in runs.items():
        p = torch.tensor(r["path"])
        ax.plot(p[:, 0], p[:, 1], "-", color=colors[name], lw=1.6, label=name)
        ax.plot(p[-1, 0], p[-1, 1], "*", color=colors[name], mec="k", ms=12)
        ax2.semilogy(r["losses"], color=colors[name], label=name)
    p0 = torch.tensor(next(iter(runs.values()))["path"][0])
    ax.plot(p0[0], p0[1], "o", color="white", mec="k", ms=9)
    ax.set_xlabel("W1[0, 0]")
    ax.set_ylabel("W1[0, 1]")
    ax.set_title("all trajectories from the same initialisation (no common loss surface: "
                 "it depends on the other parameters)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set_xlabel("step (full batch)")
    ax2.set_ylabel("training loss")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectories(
    out: Path,
    steps: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    learning_rates: dict[str, float] | None = None,
    grid: int = 80,
) -> dict[str, Any]:
    """Optimizer trajectories of the first hidden unit's input weights on iris (module
    docstring). Full-batch steps; every optimizer starts from the same initialisation."""
    from sklearn.decomposition import PCA

    out.mkdir(parents=True, exist_ok=True)
    steps = 300 if steps is None else steps
    lrs = dict(TRAJECTORY_LR, **(learning_rates or {}))
    data = iris()
    pca = PCA(n_components=2).fit(data.x_train.numpy())
    x_tr = torch.as_tensor(pca.transform(data.x_train.numpy()), dtype=torch.float32)
    x_te = torch.as_tensor(pca.transform(data.x_test.numpy()), dtype=torch.float32)
    y_tr, y_te = data.y_train, data.y_test
    torch.manual_seed(seed)
    init = {k: v.clone() for k, v in IrisMLP().state_dict().items()}
    runs: dict[str, dict] = {}
    models: dict[str, nn.Module] = {}
    bar = _progress(steps * len(lrs), "trajectories", quiet)
    for name, lr in lrs.items():
        model = IrisMLP()
        model.load_state_dict(init)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = _make_trajectory_optimizer(name, model, lr)
        w = model[0].weight
        path, losses = [[w[0, 0].item(), w[0, 1].item()]], []
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(x_tr), y_tr)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            path.append([w[0, 0].item(), w[0, 1].item()])
            bar.update()
        with torch.no_grad():
            final_loss = F.cross_entropy(model(x_tr), y_tr).item()
        p = torch.tensor(path)
        parts = {}
        if hasattr(opt, "estimator"):  # a curvlab optimizer: name its parts
            parts = dict(estimator=repr(opt.estimator), update_rule=repr(opt.update_rule),
                         damping=repr(opt.damping), normalizer=repr(opt.normalizer))
        runs[name] = dict(
            lr=lr, optimizer=type(opt).__name__, parts=parts, final_train_loss=final_loss,
            test_accuracy=accuracy(model, x_te, y_te),
            train_accuracy=accuracy(model, x_tr, y_tr),
            start=path[0], end=path[-1],
            path_length=(p[1:] - p[:-1]).norm(dim=1).sum().item(),
            displacement=(p[-1] - p[0]).norm().item(),
            path=path, losses=losses,
        )
        models[name] = model
    bar.close()

    def window(points: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = points.min(0).values, points.max(0).values
        span = (hi - lo).clamp_min(0.5)
        lo, hi = lo - 0.25 * span, hi + 0.25 * span
        return torch.linspace(lo[0], hi[0], grid), torch.linspace(lo[1], hi[1], grid)

    surfaces = {}
    for name, model in models.items():
        a, b = window(torch.tensor(runs[name]["path"]))
        surfaces[name] = (a, b, loss_surface(model, x_tr, y_tr, a, b))
    _plot_trajectories(out / "trajectories.png", runs, surfaces)
    _plot_trajectory_overlay(out / "trajectories_overlay.png", runs)
    result = dict(
        analysis="trajectories",
        config=dict(data="iris, standardised, PCA to 2 components (fit on the training split)",
                    pca_explained_variance_ratio=pca.explained_variance_ratio_.tolist(),
                    model="Linear(2, 2) - tanh - Linear(2, 3)", steps=steps, batch="full",
                    seed=seed, coordinates=["W1[0,0]", "W1[0,1]"],
                    surface="mean cross-entropy on the training split over the two coordinates, "
                            "every other parameter at the optimizer's final values",
                    learning_rates=lrs),
        optimizers={n: {k: v for k, v in r.items() if k not in ("path", "losses")}
                    for n, r in runs.items()},
        paths={n: r["path"] for n, r in runs.items()},
        figures=["trajectories.png", "trajectories_overlay.png"],
    )
    write_json(out / "results.json", result)
    return result


# -- 4. curvature range ---------------------------------------------------------------------------
def layer_ratios(opt, model: nn.Module) -> dict[str, Tensor]:  # noqa: ANN001
    """``F/λ`` of every parameter of every supported layer (its entries concatenated)."""
    lam = opt.damping.value(opt.metrics()["steps"])
    out = {}
    for record in opt.layers:
        out[record.name] = torch.cat(
            [(opt.preconditioner(p) / lam).reshape(-1) for p in record.params.values()]
        ).double()
    return out


def _plot_ranges(path: Path, series: dict[str, dict], interval: int) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, variant in zip(axes[:2], ("paper", "official")):
        s = series[variant]
        steps = s["steps"]
        for i, name in enumerate(s["layers"]):
            color = f"C{i}"
            ax.plot(steps, s["layers"][name]["median"], "-", color=color, label=f"{name} median")
            ax.fill_between(steps, s["layers"][name]["min"], s["layers"][name]["max"],
                            color=color, alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("F / λ  (band: min–max, line: median)")
        ax.set_title(f"{variant} variant (curvature every {s['interval']} steps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    s = series["official"]
    ax = axes[2]
    start = min(2 * interval + 1, s["steps"][-1])
    keep = [i for i, t in enumerate(s["steps"]) if t >= start]
    for i, name in enumerate(s["layers"]):
        color = f"C{i}"
        st = [s["steps"][k] for k in keep]
        ax.plot(st, [s["layers"][name]["median"][k] for k in keep], "-", color=color, label=name)
        ax.fill_between(st, [s["layers"][name]["min"][k] for k in keep],
                        [s["layers"][name]["max"][k] for k in keep], color=color, alpha=0.15)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.axhline(1.08, color="k", lw=0.6, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_title("official, after the 3rd curvature update (linear scale)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_histograms(path: Path, hists: dict[str, dict[int, dict[str, Tensor]]]) -> None:
    """Per variant (row) and checkpoint (column), one step histogram per layer of ``F/λ − 1`` on
    a log axis (both variants on one scale: the paper's spans up to 1/λ = 1000, the official
    one's shrinks towards 0); values ≤ 1e-8 (an entry at min-max 0, or H·S below float32
    resolution) fall into the leftmost bin."""
    plt = _pyplot()
    variants = list(hists)
    columns = max(len(h) for h in hists.values())
    bins = torch.logspace(-8, math.log10(1001), 56).numpy()
    fig, axes = plt.subplots(len(variants), columns, figsize=(3.6 * columns, 3.0 * len(variants)),
                             squeeze=False, sharex=True)
    for row, variant in enumerate(variants):
        for col, (step, layers) in enumerate(hists[variant].items()):
            ax = axes[row][col]
            for i, (name, ratios) in enumerate(layers.items()):
                r = (ratios - 1.0).clamp(1.01e-8, 1000.0).numpy()
                ax.hist(r, bins=bins, histtype="step", color=f"C{i}", lw=1.2, label=f"layer {name}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.tick_params(labelsize=7)
            ax.set_title(f"{variant}, step {step}", fontsize=9)
            if col == 0:
                ax.set_ylabel("entries", fontsize=8)
            if row == len(variants) - 1:
                ax.set_xlabel("F / λ − 1", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("F/λ − 1 per layer (leftmost bin: ≤ 1e-8)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curvature_range(
    out: Path,
    steps: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    width: int = 8,
    batch_size: int = 64,
    official_interval: int = 100,
    paper_interval: int = 1,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """``F/λ`` over training for the paper and official AdaFisher on the digits CNN: per layer
    min/median/max after every step, histograms at checkpoints, and the range after each of the
    official variant's curvature updates."""
    import curvlab

    out.mkdir(parents=True, exist_ok=True)
    data = digits()
    steps = 6 * official_interval if steps is None else steps
    torch.manual_seed(seed)
    init = {k: v.clone() for k, v in DigitsCNN(width).state_dict().items()}
    # histogram checkpoints: right after official updates 1, 2, 3, and the last step
    hist_steps = sorted({s for s in (1, official_interval + 1, 2 * official_interval + 1, steps)
                         if 1 <= s <= steps})
    series, per_update, results, all_hists = {}, {}, {}, {}
    bar = _progress(2 * steps, "curvature-range", quiet)
    for variant, interval in (("paper", paper_interval), ("official", official_interval)):
        model = DigitsCNN(width)
        model.load_state_dict(init)
        opt = curvlab.AdaFisher(model, lr=lr, variant=variant, curvature_interval=interval)
        lam = opt.damping.value(0)
        eps = getattr(opt.normalizer, "eps", 0.0)
        probe = None
        if variant == "official":  # lr = 0, γ = 0, no normaliser: the raw estimates Ĥ, Ŝ
            from curvlab.presets import OFFICIAL_ADAPTERS

            probe = curvlab.CurvatureOptimizer(
                model, lr=0.0, gamma=0.0, adapters=OFFICIAL_ADAPTERS, normalizer="identity",
                curvature_interval=interval, damp_fallback=False, warn_on_fallback=False,
                exclusive=False,
            )
        index = batches(len(data.x_train), batch_size, seed)
        s = {"steps": [], "interval": interval, "loss": [], "layers": {}}
        hists: dict[int, dict[str, Tensor]] = {}
        updates = []
        for step in range(1, steps + 1):
            idx = next(index)
            curvature_step = opt.is_curvature_step
            opt.zero_grad()
            if probe is not None:
                probe.zero_grad()
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            if probe is not None:
                probe.step()
            opt.step()
            ratios = layer_ratios(opt, model)
            s["steps"].append(step)
            s["loss"].append(loss.item())
            for name, r in ratios.items():
                entry = s["layers"].setdefault(name, {"min": [], "median": [], "max": []})
                entry["min"].append(r.min().item())
                entry["median"].append(r.median().item())
                entry["max"].append(r.max().item())
            if curvature_step:
                every = torch.cat(list(ratios.values()))
                # what min-max sees: the raw estimate (official) or the EMA (paper); its largest
                # normalised value is range / (range + ε), far below 1 when range ≲ ε
                source = (probe if probe is not None else opt).curvature_state
                ranges = {n: {k: (st[k].max() - st[k].min()).item() for k in ("H", "S")}
                          for n, st in source.items()}
                updates.append(dict(
                    update=len(updates) + 1, step=step,
                    min=every.min().item(), max=every.max().item(),
                    per_layer={n: dict(min=r.min().item(), max=r.max().item())
                               for n, r in ratios.items()},
                    factor_range=ranges,
                    minmax_max={n: {k: v / (v + eps) if v + eps > 0 else 0.0
                                    for k, v in r.items()} for n, r in ranges.items()},
                ))
            if step in hist_steps:
                hists[step] = dict(ratios)
            bar.update()
            bar.set_postfix(variant=variant, loss=f"{loss.item():.3f}")
        all_hists[variant] = hists
        series[variant] = s
        per_update[variant] = updates

        def overall(from_step: int, s=s) -> dict[str, float]:
            keep = [i for i, t in enumerate(s["steps"]) if t >= from_step]
            if not keep:
                return dict(min=math.nan, median_of_medians=math.nan, max=math.nan)
            lo = min(s["layers"][n]["min"][i] for n in s["layers"] for i in keep)
            hi = max(s["layers"][n]["max"][i] for n in s["layers"] for i in keep)
            med = sorted(s["layers"][n]["median"][i] for n in s["layers"] for i in keep)
            return dict(min=lo, median_of_medians=med[len(med) // 2], max=hi)

        third = updates[2]["step"] if len(updates) >= 3 else None
        results[variant] = dict(
            curvature_interval=interval, damping=lam, minmax_eps=eps, updates=len(updates),
            minmax_sees="raw estimates (min-max before the EMA)" if probe is not None
            else "the EMA of raw estimates",
            range_all_steps=overall(1),
            range_after_third_update=overall(third) if third else None,
            # every update for the official variant; the paper one updates every step: the
            # first 10, every 50th and the last (the per-step series has all of them)
            per_update=[u for i, u in enumerate(updates)
                        if i < 10 or u["update"] % 50 == 0 or i == len(updates) - 1],
            per_layer_final={n: {k: v[-1] for k, v in e.items()}
                             for n, e in s["layers"].items()},
            per_layer_all_steps={n: dict(min=min(e["min"]), max=max(e["max"]))
                                 for n, e in s["layers"].items()},
            final_train_loss=sum(s["loss"][-10:]) / len(s["loss"][-10:]),
            test_accuracy=accuracy(model, data.x_test, data.y_test),
            histogram_steps=sorted(hists),
        )
    bar.close()
    _plot_ranges(out / "range_over_steps.png", series, official_interval)
    _plot_histograms(out / "histograms.png", all_hists)
    result = dict(
        analysis="curvature-range",
        config=dict(model=f"DigitsCNN(width={width})", lr=lr, steps=steps,
                    batch_size=batch_size, seed=seed, paper_interval=paper_interval,
                    official_interval=official_interval,
                    ratio="opt.preconditioner(p) / λ over every parameter of every supported "
                          "layer"),
        variants=results,
        series={v: dict(steps=s["steps"], layers=s["layers"]) for v, s in series.items()},
        figures=["range_over_steps.png", "histograms.png"],
    )
    write_json(out / "results.json", result)
    return result


# -- command line ---------------------------------------------------------------------------------
ANALYSES: dict[str, tuple[Callable[..., dict], str]] = {
    "diagonal-concentration": (diagonal_concentration,
                               "diagonal concentration of full Kronecker factors (digits CNN)"),
    "diagonal-accuracy": (diagonal_accuracy,
                          "MAE of curvlab's Fisher diagonal vs BackPACK DiagGGN exact / MC"),
    "trajectories": (trajectories, "AdaFisher / Adam / K-FAC / SGD trajectories on iris"),
    "curvature-range": (curvature_range, "F/λ over training, paper vs official variant"),
}


def headline(name: str, result: dict) -> list[str]:
    """A few summary lines per analysis (printed by the command)."""
    lines = []
    if name == "diagonal-concentration":
        for layer, f in result["final"].items():
            lines.append(
                f"layer {layer}: energy on diagonal A {f['A']['energy_fraction']:.3f} "
                f"G {f['G']['energy_fraction']:.3f}; SNR A {f['A']['snr']:.3g} "
                f"G {f['G']['snr']:.3g}; eig shift/λmax A {f['A']['relative_shift']:.2e} "
                f"G {f['G']['relative_shift']:.2e}"
            )
    elif name == "diagonal-accuracy":
        for layer, f in result["final"].items():
            lines.append(
                f"layer {layer}: MAE vs exact {f['batch']['exact']['mae']:.3e} "
                f"(rel {f['batch']['exact']['relative_mae']:.3f}), vs MC "
                f"{f['batch']['mc']['mae']:.3e} (rel {f['batch']['mc']['relative_mae']:.3f})"
            )
    elif name == "trajectories":
        for opt, r in result["optimizers"].items():
            lines.append(f"{opt}: loss {r['final_train_loss']:.4f}, test acc "
                         f"{r['test_accuracy']:.3f}, path length {r['path_length']:.3f}")
    elif name == "curvature-range":
        for variant, r in result["variants"].items():
            a = r["range_all_steps"]
            lines.append(f"{variant}: F/λ over all steps [{a['min']:.4g}, {a['max']:.4g}]")
            t = r["range_after_third_update"]
            if t:
                lines.append(f"{variant}: after the 3rd curvature update "
                             f"[{t['min']:.4g}, {t['max']:.4g}]")
    return lines


def run(name: str, out: str | Path | None = None, num_threads: int | None = 1,
        **kwargs: Any) -> dict[str, Any]:
    """Run one analysis by name (``kwargs`` go to its function); returns its results."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; choose from {sorted(ANALYSES)}")
    out = Path(out) if out is not None else DEFAULT_OUT / name
    with threads(num_threads):
        start = time.perf_counter()
        result = ANALYSES[name][0](out, **kwargs)
        result["wall_time_s"] = time.perf_counter() - start
    write_json(out / "results.json", result)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=[*ANALYSES, "all"], help="which analysis ('all': every one)")
    p.add_argument("--out", default=None,
                   help=f"output directory (default {DEFAULT_OUT}/NAME; with 'all', DIR/NAME)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: each analysis's own, see the docs)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and initialisation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: tiny models, shared machines)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="another keyword of the analysis function, as a Python literal, e.g. "
                        "--set width=16 or --set \"learning_rates={'Adam': 0.01}\" "
                        "(repeatable; see each function's signature)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, summary lines only")


def parse_options(items: list[str], name: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings → keyword arguments of analysis ``name`` (values: Python literals,
    or the bare string); an unknown key is an error that lists the known ones."""
    import ast
    import inspect

    known = [k for k in inspect.signature(ANALYSES[name][0]).parameters
             if k not in ("out", "steps", "seed", "quiet")]
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise SystemExit(f"curvlab analyze {name}: --set {item!r}: expected KEY=VALUE with "
                             f"KEY one of {', '.join(known)}")
        try:
            options[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key] = value.strip()
    return options


def main(args: argparse.Namespace) -> int:
    names = list(ANALYSES) if args.name == "all" else [args.name]
    if args.options and len(names) > 1:
        raise SystemExit("curvlab analyze all: --set applies to a single analysis")
    for name in names:
        if args.out is None:
            out = DEFAULT_OUT / name
        else:
            out = Path(args.out) / name if args.name == "all" else Path(args.out)
        result = run(name, out, args.threads, steps=args.steps, seed=args.seed,
                     quiet=args.quiet, **parse_options(args.options, name))
        print(f"{name}: {result['wall_time_s']:.1f} s, wrote {out}/results.json and "
              f"{', '.join(result['figures'])}")
        for line in headline(name, result):
            print(f"  {line}")
    return 0
