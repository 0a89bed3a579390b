"""``curvlab bench``: time a full training step per optimizer and write JSON.

For each model and device, every optimizer gets its own copy of the *same* initial weights and
the same synthetic batch; a step is ``zero_grad`` + forward + backward + ``step()`` (the
``fwd_bwd`` row leaves out ``step()``). After a warm-up, the optimizers run interleaved in one
process: several rounds, each round giving every optimizer a short block of consecutive steps
(round-robin, the order rotated every round), so that a change of machine load hits every
optimizer alike. Ratios to ``torch.optim.Adam`` are computed from the same run.

Every block starts from the initial weights again (restored outside the timed region, the
optimizer state carries on), so that all optimizers time the same model at the same weights
however far their training has drifted, and, on CPU, denormal floats are flushed to zero
(``torch.set_flush_denormal``): a model that memorises the fixed synthetic batch produces
denormal gradients, which made the backward pass of one optimizer twice as slow as the others'
(measured: the official variant's ResNet-18 steps went from 0.55 s to 1.1 s after 12 steps).
``--no-reset`` / ``--no-flush-denormal`` turn these off.

Optimizers whose work depends on the step (curvature every k steps, eigenbases every k steps)
are timed over a whole number of their periods: any ``n·k`` consecutive steps of one optimizer
contain exactly ``n`` curvature steps, so the **mean** is the amortised cost. The median hides
those steps; report interval settings by the mean.

Peak memory is measured in a separate phase after the timing, one optimizer at a time (fresh
model copy, a few steps from the first, which is a curvature step): CUDA
``torch.cuda.max_memory_allocated`` above what was allocated before the model was copied to the
device; CPU the growth of the process's peak
resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) above the resident
set before the copy — an approximation (the C allocator may reuse memory it already holds), or
``None`` where that reset is not possible or ``--cpu-memory none``.

``--profile DIR`` also runs a few steps of each optimizer under ``torch.profiler`` with every
curvlab hook wrapped in a ``record_function`` named after its layer, and writes the top ops and
the per-layer hook cost (text tables, plus a summary in the JSON).

Example::

    curvlab bench --out docs/results/bench_cpu.json                 # CPU, the default models
    curvlab bench --models resnet18,gpt --skip resnet18:banded
    curvlab bench --quick --models mlp --optimizers adam,adafisher   # seconds (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCHEMA = "curvlab.bench/1"
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- models ------------------------------------------------------------------------------------
@dataclass
class Workload:
    """A model, its synthetic batch and its loss, at one size."""

    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)


def _classification(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def _language_model(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _images(n: int, channels: int = 3, size: int = 32, classes: int = 10):
    def make(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, channels, size, size, generator=gen)
        return x, torch.randint(0, classes, (n,), generator=gen)

    return make


def _tokens(n: int, t: int, vocab: int):
    def make(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, vocab, (n, t + 1), generator=gen)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    return make


def _mlp(batch: int, in_features: int, hidden: tuple[int, ...]) -> Workload:
    from curvlab.experiments.models import mlp

    def make(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randn(batch, in_features, generator=gen), torch.randint(
            0, 10, (batch,), generator=gen
        )

    return Workload(
        f"MLP {in_features}-{'-'.join(map(str, hidden))}-10, batch {batch}",
        lambda: mlp(in_features=in_features, hidden=hidden, num_classes=10),
        make,
        _classification,
        batch,
        dict(in_features=in_features, hidden=list(hidden)),
    )


def _resnet(depth: int, batch: int) -> Workload:
    from curvlab.experiments.models import resnet18, resnet50

    build = {18: resnet18, 50: resnet50}[depth]
    return Workload(
        f"ResNet-{depth} CIFAR (32×32), batch {batch}",
        lambda: build(num_classes=10),
        _images(batch),
        _classification,
        batch,
    )


def _gpt(
    batch: int, tokens: int, d_model: int, heads: int, layers: int = 4, vocab: int = 256
) -> Workload:
    from curvlab.experiments.models import gpt

    return Workload(
        f"GPT {layers}×d{d_model} ({heads} heads, vocab {vocab}, tied head), "
        f"{batch}×{tokens} tokens",
        lambda: gpt(
            vocab_size=vocab, context=tokens, d_model=d_model, n_layers=layers, n_heads=heads
        ),
        _tokens(batch, tokens, vocab),
        _language_model,
        batch,
        dict(tokens=tokens, d_model=d_model, heads=heads, layers=layers, vocab=vocab),
    )


def _gpt_mha(batch: int, tokens: int, d_model: int, heads: int, layers: int = 4) -> Workload:
    """``_gpt``'s sizes, built from nn.TransformerEncoderLayer (nn.MultiheadAttention) blocks."""
    from curvlab.experiments.models import transformer_gpt

    work = _gpt(batch, tokens, d_model, heads, layers)
    work.description = work.description.replace("GPT", "GPT of nn.TransformerEncoderLayer", 1)
    work.build = lambda: transformer_gpt(
        vocab_size=256, context=tokens, d_model=d_model, n_layers=layers, n_heads=heads
    )
    return work


#: model → size per device kind ("cuda": the SPEC §6 sizes; "cpu": smaller; "quick": tests)
WORKLOADS: dict[str, dict[str, Callable[[], Workload]]] = {
    "mlp": {
        "cuda": lambda: _mlp(256, 3072, (1024, 512)),
        "cpu": lambda: _mlp(64, 3072, (1024, 512)),
        "quick": lambda: _mlp(16, 64, (32,)),
    },
    "resnet18": {
        "cuda": lambda: _resnet(18, 256),
        "cpu": lambda: _resnet(18, 32),
        "quick": lambda: _resnet(18, 2),
    },
    "resnet50": {
        "cuda": lambda: _resnet(50, 128),
        "cpu": lambda: _resnet(50, 16),
        "quick": lambda: _resnet(50, 2),
    },
    "gpt": {
        "cuda": lambda: _gpt(32, 128, 512, 8),
        "cpu": lambda: _gpt(8, 64, 256, 4),
        "quick": lambda: _gpt(2, 16, 32, 2, layers=2),
    },
    "gpt_mha": {
        "cuda": lambda: _gpt_mha(32, 128, 512, 8),
        "cpu": lambda: _gpt_mha(8, 64, 256, 4),
        "quick": lambda: _gpt_mha(2, 16, 32, 2, layers=2),
    },
}


# -- optimizers --------------------------------------------------------------------------------
@dataclass
class OptimizerSpec:
    label: str
    build: Callable[[nn.Module], torch.optim.Optimizer | None]
    #: only these models (None: all)
    models: tuple[str, ...] | None = None


def _adafisher(interval: int, variant: str = "paper", w: bool = False):
    def build(model: nn.Module) -> torch.optim.Optimizer:
        from curvlab import AdaFisher, AdaFisherW

        cls = AdaFisherW if w else AdaFisher
        return cls(model, curvature_interval=interval, variant=variant)

    return build


def _from_config(config: str):
    def build(model: nn.Module) -> torch.optim.Optimizer:
        from curvlab.config import build_optimizer

        return build_optimizer(model, config)

    return build


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "fwd_bwd": OptimizerSpec("forward + backward only (no step)", lambda m: None),
    "adam": OptimizerSpec(
        "torch.optim.Adam(lr=1e-3, foreach=True)",
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True),
    ),
    "sgd": OptimizerSpec(
        "torch.optim.SGD(lr=0.01, momentum=0.9, foreach=True)",
        lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=True),
    ),
    "adafisher": OptimizerSpec("curvlab AdaFisher (paper), curvature_interval=1", _adafisher(1)),
    "adafisher_k10": OptimizerSpec(
        "curvlab AdaFisher (paper), curvature_interval=10", _adafisher(10)
    ),
    "official_k100": OptimizerSpec(
        "curvlab AdaFisher variant='official', curvature_interval=100 (TCov)",
        _adafisher(100, "official"),
    ),
    "official_k1": OptimizerSpec(
        "curvlab AdaFisher variant='official', curvature_interval=1", _adafisher(1, "official")
    ),
    "adafisherw": OptimizerSpec(
        "curvlab AdaFisherW (paper), curvature_interval=1", _adafisher(1, w=True), models=("gpt",)
    ),
    "kfac": OptimizerSpec(
        "configs/kfac.gin (full factors, curvature every step, inverse_interval=10)",
        _from_config("configs/kfac.gin"),
    ),
    "banded": OptimizerSpec(
        "configs/banded_adafisher.gin (bandwidth 8, inverse_interval=1)",
        _from_config("configs/banded_adafisher.gin"),
    ),
}
DEFAULT_MODELS = ("mlp", "resnet18", "resnet50", "gpt")
DEFAULT_OPTIMIZERS = tuple(OPTIMIZERS)  # the rows below run when named

# ASDL's K-FAC baseline, the K-FAC / banded rows at curvature 10 / inverse 100, ResNet-18 b16
from curvlab.experiments import bench_baselines  # noqa: E402

bench_baselines.register(OPTIMIZERS, WORKLOADS, OptimizerSpec, _resnet)


def period_of(opt: torch.optim.Optimizer | None) -> int:
    """Steps after which the optimizer's per-step work repeats (curvature / inverse intervals)."""
    k1 = int(getattr(opt, "curvature_interval", 1))
    k2 = int(getattr(opt, "inverse_interval", 1))
    return math.lcm(k1, k2)


def describe_optimizer(opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    if opt is None:
        return {}
    out: dict[str, Any] = {"class": type(opt).__name__}
    for key in ("curvature_interval", "inverse_interval", "gamma", "ema", "variant"):
        if hasattr(opt, key):
            out[key] = getattr(opt, key)
    for key in ("estimator", "normalizer", "damping", "update_rule"):
        if hasattr(opt, key):
            out[key] = repr(getattr(opt, key))
    return out


# -- environment -------------------------------------------------------------------------------
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _proc_status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- timing ------------------------------------------------------------------------------------
class Runner:
    """One optimizer on its own model copy; ``step()`` does one timed training step."""

    def __init__(self, name: str, model: nn.Module, opt, x: Tensor, y: Tensor, loss_fn) -> None:
        self.name, self.model, self.opt = name, model, opt
        self.x, self.y, self.loss_fn = x, y, loss_fn
        self.times_ms: list[float] = []
        self.steps_done = 0

    def step(self) -> None:
        if hasattr(self.opt, "train_step"):  # a baseline that owns its whole step (ASDL)
            self.opt.train_step(self.model, self.x, self.y, self.loss_fn)
            self.steps_done += 1
            return
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        self.steps_done += 1


def run_block(
    runner: Runner, steps: int, device: torch.device, record: bool, tick=None
) -> list[float]:
    """``steps`` consecutive steps; per-step times in ms (CUDA events: no sync inside the block)."""
    times: list[float] = []
    if steps <= 0:
        return times
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            runner.step()
            events[i + 1].record()
            if tick:
                tick()
        torch.cuda.synchronize(device)
        times = [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
    else:
        for _ in range(steps):
            t0 = time.perf_counter_ns()
            runner.step()
            times.append((time.perf_counter_ns() - t0) / 1e6)
            if tick:
                tick()
    if record:
        runner.times_ms.extend(times)
    return times


def summarize(times: list[float]) -> dict[str, Any]:
    ordered = sorted(times)
    n = len(ordered)
    mid = n // 2
    median = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    mean = sum(ordered) / n
    std = math.sqrt(sum((t - mean) ** 2 for t in ordered) / (n - 1)) if n > 1 else 0.0
    return {
        "steps": n,
        "median_ms": round(median, 4),
        "mean_ms": round(mean, 4),
        "std_ms": round(std, 4),
        "min_ms": round(ordered[0], 4),
        "max_ms": round(ordered[-1], 4),
    }


def split_steps(total: int, rounds: int) -> list[int]:
    """``total`` steps over ``rounds`` blocks, as evenly as possible."""
    base, extra = divmod(total, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def measured_steps(min_steps: int, period: int) -> int:
    """The smallest whole number of periods with at least ``min_steps`` steps."""
    return max(1, math.ceil(min_steps / period)) * period


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    for w in caught:
        text = str(w.message).splitlines()[0]
        if text not in messages:
            messages.append(f"{w.category.__name__}: {text}")


def build_runner(
    name: str, template: nn.Module, device: torch.device, x: Tensor, y: Tensor, loss_fn
):
    model = copy.deepcopy(template).to(device).train()
    with collect_warnings() as notes:
        opt = OPTIMIZERS[name].build(model)
    return Runner(name, model, opt, x, y, loss_fn), notes


# -- memory --------------------------------------------------------------------------------------
def _malloc_trim() -> None:
    """Give the C allocator's free memory back to the OS (glibc), so that RSS measures use."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def measure_memory(
    name: str,
    template: nn.Module,
    device: torch.device,
    x: Tensor,
    y: Tensor,
    loss_fn,
    steps: int,
    cpu_mode: str,
) -> tuple[float | None, str]:
    """Peak memory (MiB) of model + optimizer state + one step's activations, in isolation."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner, _ = build_runner(name, template, device, x, y, loss_fn)
        for _ in range(steps):
            runner.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del runner
        gc.collect()
        torch.cuda.empty_cache()
        return peak / 2**20, "cuda.max_memory_allocated"
    if cpu_mode != "rss":
        return None, "none"
    _malloc_trim()
    base = _proc_status_kib("VmRSS")
    if base is None or not _reset_peak_rss():
        return None, "none (no /proc/self/clear_refs)"
    runner, _ = build_runner(name, template, device, x, y, loss_fn)
    for _ in range(steps):
        runner.step()
    peak = _proc_status_kib("VmHWM")
    del runner
    release_memory(device)
    if peak is None:
        return None, "none"
    return max(peak - base, 0) / 1024, "rss_hwm_delta"


# -- profiling -----------------------------------------------------------------------------------
@contextlib.contextmanager
def labelled_hooks() -> Iterator[None]:
    """While active, hooks attached by newly built curvlab optimizers run inside
    ``record_function("curvlab.<forward|output>_hook.<layer>")`` (curvlab itself is untouched)."""
    from curvlab.capture import CaptureEngine

    fwd, out = CaptureEngine._forward_hook, CaptureEngine._output_hook

    def forward_hook(self, record, dtype, module, inputs, output):  # noqa: ANN001
        with torch.profiler.record_function(f"curvlab.forward_hook.{record.name}"):
            return fwd(self, record, dtype, module, inputs, output)

    def output_hook(self, record, dtype, input_stat, grad):  # noqa: ANN001
        with torch.profiler.record_function(f"curvlab.output_hook.{record.name}"):
            return out(self, record, dtype, input_stat, grad)

    CaptureEngine._forward_hook, CaptureEngine._output_hook = forward_hook, output_hook
    try:
        yield
    finally:
        CaptureEngine._forward_hook, CaptureEngine._output_hook = fwd, out


def profile_runner(
    runner: Runner, device: torch.device, steps: int, out_dir: Path, tag: str
) -> dict:
    """Profile ``steps`` steps; write the op table and return a summary (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("bench.train_step"):
                runner.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = averages.table(sort_by=sort_key, row_limit=40, max_name_column_width=70)
    (out_dir / f"{tag}.txt").write_text(table + "\n")

    def per_step(us: float) -> float:
        return round(us / 1000 / steps, 4)

    regions: dict[str, float] = {}
    hooks: dict[str, float] = {}
    ops = []
    for evt in averages:
        key = evt.key
        if key.startswith("curvlab."):
            hooks[key] = per_step(evt.cpu_time_total)
        elif (
            key == "bench.train_step"
            or key.startswith("Optimizer.step#")
            or key.startswith("Optimizer.zero_grad#")
        ):
            regions[key] = per_step(evt.cpu_time_total)
        elif not key.startswith("ProfilerStep") and not key.startswith("bench."):
            ops.append((evt.self_cpu_time_total, key, evt.count))
    ops.sort(reverse=True)
    fwd = sum(v for k, v in hooks.items() if k.startswith("curvlab.forward_hook."))
    bwd = sum(v for k, v in hooks.items() if k.startswith("curvlab.output_hook."))
    return {
        "steps": steps,
        "regions_ms_per_step": regions,
        "forward_hooks_ms_per_step": round(fwd, 4),
        "output_hooks_ms_per_step": round(bwd, 4),
        "hooks_ms_per_step": dict(sorted(hooks.items(), key=lambda kv: -kv[1])),
        "top_self_cpu_ops_ms_per_step": [
            {"op": key, "self_cpu_ms": per_step(t), "calls_per_step": round(c / steps, 2)}
            for t, key, c in ops[:15]
        ],
        "table": str(out_dir / f"{tag}.txt"),
    }


# -- one model on one device -----------------------------------------------------------------------
def selected(name: str, model: str, skips: list[str]) -> str | None:
    """Why (model, optimizer) is skipped, or None."""
    spec = OPTIMIZERS[name]
    if spec.models is not None and model not in spec.models:
        return f"only run on {', '.join(spec.models)}"
    for pattern in skips:
        m_pat, _, o_pat = pattern.partition(":")
        if fnmatch.fnmatch(model, m_pat) and fnmatch.fnmatch(name, o_pat or "*"):
            return f"skipped by --skip {pattern}"
    return None


def bench_model(model_name: str, device: torch.device, args: argparse.Namespace, bar) -> dict:
    size = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    work = WORKLOADS[model_name][size]()
    torch.manual_seed(args.seed)
    template = work.build()
    gen = torch.Generator().manual_seed(args.seed)
    x, y = work.batch(gen)
    x, y = x.to(device), y.to(device)
    result: dict[str, Any] = {
        "model": model_name,
        "device": str(device),
        "size": size,
        "description": work.description,
        "batch_size": work.batch_size,
        "input_shape": list(x.shape),
        "parameters": sum(p.numel() for p in template.parameters()),
        **work.extra,
        "optimizers": {},
        "skipped": {},
    }
    names = []
    for name in args.optimizers:
        reason = selected(name, model_name, args.skip)
        if reason is None:
            names.append(name)
        elif OPTIMIZERS[name].models is None or model_name in OPTIMIZERS[name].models:
            result["skipped"][name] = reason

    runners: dict[str, Runner] = {}
    notes: dict[str, list[str]] = {}
    for name in names:
        runners[name], notes[name] = build_runner(name, template, device, x, y, work.loss)
    # warm-up (also the feasibility probe)
    for name in list(runners):
        if bar is not None:
            bar.set_description(f"{device.type} {model_name} warm-up {name}")
        times = run_block(runners[name], args.warmup, device, record=False)
        if args.max_step_s and times and times[-1] / 1000 > args.max_step_s:
            result["skipped"][name] = (
                f"too slow: {times[-1]:.0f} ms per step in warm-up > --max-step-s {args.max_step_s}"
            )
            del runners[name]
    plan = {
        name: split_steps(measured_steps(args.steps, period_of(r.opt)), args.rounds)
        for name, r in runners.items()
    }
    order = list(runners)
    initial = {k: v.to(device) for k, v in template.state_dict().items()} if args.reset else None
    for r in range(args.rounds):
        shift = r % max(1, len(order))
        for name in order[shift:] + order[:shift]:
            if bar is not None:
                bar.set_description(f"{device.type} {model_name} round {r + 1}/{args.rounds}")
            if initial is not None:  # every block starts from the same weights (not timed)
                runners[name].model.load_state_dict(initial)
            run_block(
                runners[name],
                plan[name][r],
                device,
                record=True,
                tick=bar.update if bar is not None else None,
            )

    for name, runner in runners.items():
        entry: dict[str, Any] = {"label": OPTIMIZERS[name].label, "period": period_of(runner.opt)}
        entry.update(summarize(runner.times_ms))
        entry["config"] = describe_optimizer(runner.opt)
        if hasattr(runner.opt, "metrics"):
            entry["skipped_steps"] = runner.opt.metrics()["skipped_steps"]
        if notes.get(name):
            entry["warnings"] = notes[name]
        entry["times_ms"] = [round(t, 4) for t in runner.times_ms]
        result["optimizers"][name] = entry
    timed = list(runners)
    runners.clear()
    runner = None  # noqa: F841 - drop the last reference before measuring memory
    release_memory(device)

    # peak memory, one optimizer at a time, after the timing phase (lazy one-time
    # initialisations are done by then, and the timing models are gone)
    for name in timed:
        mem, method = None, "not measured"
        if args.memory_steps > 0:
            if bar is not None:
                bar.set_description(f"{device.type} {model_name} memory {name}")
            mem, method = measure_memory(
                name, template, device, x, y, work.loss, args.memory_steps, args.cpu_memory
            )
        entry = result["optimizers"][name]
        entry["peak_memory_mib"] = None if mem is None else round(mem, 2)
        entry["memory_method"] = method
    adam = result["optimizers"].get("adam")
    for entry in result["optimizers"].values():
        for key, ref_key in (("median_ms", "ratio_median"), ("mean_ms", "ratio_mean")):
            entry[ref_key] = round(entry[key] / adam[key], 4) if adam else None
        if adam and entry["peak_memory_mib"] is not None and adam["peak_memory_mib"]:
            entry["ratio_memory"] = round(entry["peak_memory_mib"] / adam["peak_memory_mib"], 4)
        else:
            entry["ratio_memory"] = None

    if args.profile:
        with labelled_hooks():
            for name in timed:
                if bar is not None:
                    bar.set_description(f"{device.type} {model_name} profile {name}")
                runner, _ = build_runner(name, template, device, x, y, work.loss)
                period = period_of(runner.opt)
                run_block(runner, 2, device, record=False)  # state initialised
                # a whole period when it is short, else the steps as they come (noted)
                steps = (
                    measured_steps(args.profile_steps, period)
                    if period <= 10
                    else args.profile_steps
                )
                tag = f"{device.type}_{model_name}_{name}"
                result["optimizers"][name]["profile"] = profile_runner(
                    runner, device, steps, Path(args.profile), tag
                )
                del runner
        release_memory(device)
    return result


# -- reporting -------------------------------------------------------------------------------------
def markdown_table(report: dict) -> str:
    """One table per (model, device): median, mean, ratios to Adam, peak memory."""
    lines = []
    for res in report["results"]:
        lines.append(f"\n**{res['description']}** on {res['device']}\n")
        lines.append(
            "| optimizer | period | steps | median ms | mean ms | median / Adam | mean / Adam "
            "| peak MiB |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, e in res["optimizers"].items():
            mem = "—" if e["peak_memory_mib"] is None else f"{e['peak_memory_mib']:.0f}"
            rm = "—" if e["ratio_median"] is None else f"{e['ratio_median']:.2f}×"
            ra = "—" if e["ratio_mean"] is None else f"{e['ratio_mean']:.2f}×"
            lines.append(
                f"| {name} | {e['period']} | {e['steps']} | {e['median_ms']:.1f} | "
                f"{e['mean_ms']:.1f} | {rm} | {ra} | {mem} |"
            )
        for name, why in res["skipped"].items():
            lines.append(f"| {name} | | | skipped: {why} | | | | |")
    return "\n".join(lines)


def command_line(args: argparse.Namespace) -> str:
    parts = ["curvlab", "bench"]
    if args.quick:
        parts.append("--quick")
    parts += ["--models", ",".join(args.models), "--devices", ",".join(args.devices)]
    parts += ["--optimizers", ",".join(args.optimizers)]
    for s in args.skip:
        parts += ["--skip", s]
    parts += [
        "--steps",
        str(args.steps),
        "--rounds",
        str(args.rounds),
        "--warmup",
        str(args.warmup),
    ]
    parts += ["--memory-steps", str(args.memory_steps), "--cpu-memory", args.cpu_memory]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.max_step_s:
        parts += ["--max-step-s", str(args.max_step_s)]
    if args.profile:
        parts += ["--profile", args.profile, "--profile-steps", str(args.profile_steps)]
    if not args.flush_denormal:
        parts.append("--no-flush-denormal")
    if not args.reset:
        parts.append("--no-reset")
    parts += ["--seed", str(args.seed), "--out", str(args.out)]
    return shlex.join(parts)


# -- command line ---------------------------------------------------------------------------------
def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        type=_csv,
        default=None,
        help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all; --quick: mlp)",
    )
    p.add_argument(
        "--devices",
        type=_csv,
        default=None,
        help="comma-separated, e.g. cpu,cuda (default: cpu, and cuda when present)",
    )
    p.add_argument(
        "--optimizers",
        type=_csv,
        default=None,
        help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default: "
        f"{', '.join(DEFAULT_OPTIMIZERS)})",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="MODEL:OPTIMIZER",
        help="skip a pair, shell patterns allowed (e.g. resnet50:kfac, '*:banded'); repeatable",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="measured steps per optimizer, at least (rounded up to whole periods; "
        "default 20 on CPU, 100 on CUDA, 4 with --quick)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaving rounds (default 5, 2 with --quick)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps per optimizer (default 3)"
    )
    p.add_argument(
        "--memory-steps",
        type=int,
        default=None,
        help="steps of the isolated peak-memory phase (default 2; 0: skip it)",
    )
    p.add_argument(
        "--cpu-memory",
        choices=("rss", "none"),
        default="rss",
        help="CPU peak memory: growth of the peak resident set (default) or none",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument(
        "--max-step-s",
        type=float,
        default=None,
        help="skip an optimizer whose last warm-up step took longer (seconds)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="also profile each optimizer (torch.profiler); op tables go to DIR",
    )
    p.add_argument("--profile-steps", type=int, default=5, help="steps per profile (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-flush-denormal",
        dest="flush_denormal",
        action="store_false",
        help="keep denormal floats (default: flush them to zero on CPU, see the docs)",
    )
    p.add_argument(
        "--no-reset",
        dest="reset",
        action="store_false",
        help="do not restore the initial weights at the start of every round",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (tests)")
    p.add_argument(
        "--out", default=None, help="JSON path (default runs/bench/bench_<devices>.json)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _fill_defaults(args: argparse.Namespace) -> None:
    if args.models is None:
        args.models = ["mlp"] if args.quick else list(DEFAULT_MODELS)
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.optimizers is None:
        args.optimizers = list(DEFAULT_OPTIMIZERS)
    for m in args.models:
        if m not in WORKLOADS:
            raise SystemExit(
                f"curvlab bench: unknown model {m!r} (choose from {', '.join(WORKLOADS)})"
            )
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            raise SystemExit(
                f"curvlab bench: unknown optimizer {o!r} (choose from {', '.join(OPTIMIZERS)})"
            )
    for d in args.devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("curvlab bench: --devices names cuda, but CUDA is not available")
    on_cuda = any(d.startswith("cuda") for d in args.devices)
    if args.steps is None:
        args.steps = 4 if args.quick else (100 if on_cuda and args.devices == ["cuda"] else 20)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.memory_steps is None:
        args.memory_steps = 1 if args.quick else 2
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.memory_steps < 0:
        raise SystemExit("curvlab bench: --steps/--rounds must be ≥ 1, --warmup/--memory-steps ≥ 0")
    if args.out is None:
        args.out = str(Path("runs") / "bench" / f"bench_{'_'.join(args.devices)}.json")


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark that ``args`` describes and return the report (also written to --out)."""
    _fill_defaults(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    flush = bool(args.flush_denormal) and torch.set_flush_denormal(True)
    try:
        return _run(args, flush)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _run(args: argparse.Namespace, flush: bool) -> dict:
    started = time.time()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command_line(args),
        "argv": list(sys.argv),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
        "settings": {
            "quick": args.quick,
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "memory_steps": args.memory_steps,
            "cpu_memory": args.cpu_memory,
            "seed": args.seed,
            "models": args.models,
            "optimizers": args.optimizers,
            "skip": args.skip,
            "max_step_s": args.max_step_s,
            "flush_denormal": flush,
            "reset_weights_each_round": args.reset,
        },
        "devices": {},
        "results": [],
    }
    for d in args.devices:
        info = {"name": device_name(d), "type": torch.device(d).type}
        if d.startswith("cuda"):
            torch.backends.cudnn.benchmark = True
            info.update(
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
                cudnn_benchmark=True,
                float32_matmul_precision=torch.get_float32_matmul_precision(),
            )
        report["devices"][d] = info

    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=None, unit="step", leave=False)
    try:
        for d in args.devices:
            device = torch.device(d)
            for m in args.models:
                report["results"].append(bench_model(m, device, args, bar))
    finally:
        if bar is not None:
            bar.close()
    report["load_average_end"] = load_average()
    report["wall_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(args: argparse.Namespace) -> int:
    report = run(args)
    if not args.quiet:
        print(markdown_table(report))
    la0, la1 = report["load_average_start"], report["load_average_end"]
    print(
        f"bench: {len(report['results'])} model×device, {report['wall_s']} s, "
        f"torch {report['torch']}, "
        f"{report['threads']} threads, load {la0} → {la1}; wrote {args.out}"
    )
    return 0
