"""Language-model training behind ``curvlab run`` (``run.task.fn = @lm.train_lm``).

A gin-configured model (e.g. ``@models.gpt``) is trained on random contiguous windows of a
token stream (``@data.stdlib_corpus``, ``@data.wikitext2_corpus`` or any ``TextSplit``): each
step draws ``batch_size`` start positions uniformly from the training stream with a generator
seeded by ``seed`` and predicts every next token of the ``context``-long windows (mean
cross-entropy). The optimizer is curvlab's gin ``optimizer`` (:func:`curvlab.config.make_optimizer`,
the default) or any ``model -> Optimizer`` callable such as ``@baselines.torch_optimizer``.

Evaluation (model in eval mode, no grad, so curvature hooks record nothing) uses
non-overlapping ``context``-long windows of a split: every ``eval_every`` steps on an evenly
spaced, fixed subset of ``eval_tokens`` validation tokens; at the end on ``final_eval_tokens``
tokens of validation and test (``None``: the whole split). Reported per split: loss (nats per
token), perplexity ``exp(loss)`` and bits per byte ``loss / ln 2 / bytes_per_token`` (bytes per
token is 1 for byte-level corpora).

Budgets: ``steps`` (upper bound on optimizer steps) and ``time_budget_s`` (stop after the step
at which the training time reaches the budget). ``budget_clock="wall"`` measures training time
with ``time.perf_counter`` (evaluation excluded); ``"cpu"`` with the process CPU time
(``time.process_time``), which is robust to other processes sharing the machine when the run
uses one thread. Both clocks are recorded in every row (``train_time_s``, ``train_cpu_s``), as
is the 1-minute load average.

Outputs in ``out_dir`` (as :func:`curvlab.experiments.train.train`): ``metrics.jsonl`` (one
line per evaluation), ``summary.json`` (written last) and ``operative_config.gin``; a directory
that already holds a run is refused unless ``--overwrite``. ``checkpoint_every = k`` saves
``checkpoint.pt`` every k steps through the same module as ``train``
(:mod:`curvlab.experiments.checkpoint`: atomic, ``weights_only`` loading); ``resume`` continues
from it (``True``: ``out_dir/checkpoint.pt``; or a path) and refuses changed settings. Rows and
the summary count ``skipped_steps``; a run whose every step was skipped, or whose final
validation loss is not finite, ends with :class:`~curvlab.experiments.rundir.RunFailed`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.config import make_optimizer
from curvlab.experiments import models as _models  # noqa: F401 - registers @models.*
from curvlab.experiments import rundir
from curvlab.experiments import train as _train  # registers @baselines.*
from curvlab.experiments.checkpoint import (
    changed_bindings,
    config_bindings,
    load_checkpoint,
    restore,
    resume_path,
    save_checkpoint,
)
from curvlab.experiments.data import stdlib_corpus as _corpus  # noqa: F401 - @data.stdlib_corpus
from curvlab.experiments.data.stdlib_corpus import corpus_info
from curvlab.experiments.lm_windows import (  # noqa: F401 - re-exported
    LN2,
    eval_starts,
    evaluate_lm,
    lm_metrics,
    sample_batch,
    windows,
)
from curvlab.validation import check_choice, check_int, check_positive_int, check_range

SCHEDULES = ("constant", "cosine")
#: lm.train_lm settings a resumed run may change (``steps`` only with a constant schedule)
MAY_CHANGE_ON_RESUME = tuple(
    ("train_lm", name)
    for name in ("resume", "checkpoint_every", "num_threads", "device", "time_budget_s",
                 "budget_clock")
)


def _build_model(model: Callable[..., nn.Module], vocab_size: int) -> nn.Module:
    """``model(vocab_size=...)`` when the factory takes it (and gin did not bind it otherwise)."""
    try:
        params = inspect.signature(model).parameters
    except (TypeError, ValueError):
        params = {}
    if "vocab_size" in params:
        return model(vocab_size=vocab_size)
    return model()


def _describe_optimizer(opt: torch.optim.Optimizer) -> dict[str, Any]:
    out: dict[str, Any] = {"optimizer": type(opt).__name__}
    fallback = getattr(opt, "fallback_parameters", None)
    if callable(fallback):
        out["fallback_parameters"] = [f"{f.name} {list(f.shape)}" for f in fallback()]
    for key in ("variant", "ema", "curvature_interval", "damp_fallback"):
        if hasattr(opt, key):
            out[key] = getattr(opt, key)
    if hasattr(opt, "update_rule"):
        out["update_rule"] = type(opt.update_rule).__name__
    return out


@gin.configurable(module="lm", denylist=["out_dir", "quiet", "overwrite"])
def train_lm(
    model: Callable[..., nn.Module] = gin.REQUIRED,
    data: Callable[[], Any] = gin.REQUIRED,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = make_optimizer,
    steps: int = 1000,
    time_budget_s: float | None = None,
    budget_clock: str = "wall",
    batch_size: int = 16,
    context: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    warmup_steps: int = 0,
    schedule: str = "constant",
    grad_clip: float | None = None,
    eval_every: int = 100,
    eval_tokens: int | None = 32768,
    final_eval_tokens: int | None = None,
    eval_batch_size: int = 64,
    evaluate_test: bool = True,
    num_threads: int | None = None,
    checkpoint_every: int | None = None,
    resume: bool | str = False,
    out_dir: str | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``model()`` on ``data()`` with ``optimizer(model)``; return the final summary.

    ``steps``: the most optimizer steps. ``time_budget_s`` / ``budget_clock``: the training-time
    budget (module docstring). ``context``: window length (default the model's ``context``).
    ``warmup_steps``: linear warm-up of the learning rate from 0; ``schedule``: ``"constant"``
    afterwards or ``"cosine"`` decay to 0 at ``steps``. ``grad_clip``: clip the global gradient
    norm (curvature statistics are captured before clipping). ``eval_every`` / ``eval_tokens`` /
    ``final_eval_tokens``: see the module docstring; ``evaluate_test=False`` leaves the test
    split untouched (learning-rate sweeps select on validation only). ``num_threads``: torch
    intra-op threads for the run (restored afterwards). ``checkpoint_every`` / ``resume`` /
    ``overwrite``: see the module docstring.
    """
    check_choice("lm.train_lm.budget_clock", budget_clock, ("wall", "cpu"))
    check_choice("lm.train_lm.schedule", schedule, SCHEDULES)
    for key, value in (("steps", steps), ("eval_every", eval_every), ("batch_size", batch_size),
                       ("eval_batch_size", eval_batch_size)):
        check_positive_int(f"lm.train_lm.{key}", value)
    for key, value in (("context", context), ("num_threads", num_threads),
                       ("eval_tokens", eval_tokens), ("final_eval_tokens", final_eval_tokens),
                       ("checkpoint_every", checkpoint_every)):
        if value is not None:
            check_positive_int(f"lm.train_lm.{key}", value)
    check_int("lm.train_lm.seed", seed, 0)
    check_int("lm.train_lm.warmup_steps", warmup_steps, 0)
    for key, value in (("time_budget_s", time_budget_s), ("grad_clip", grad_clip)):
        if value is not None:
            check_range(f"lm.train_lm.{key}", value, 0.0)
    _train.check_device("lm.train_lm.device", device)
    if checkpoint_every is not None and out_dir is None:
        raise ValueError("lm.train_lm.checkpoint_every needs an output directory: give --out DIR")
    resume_from = resume_path(resume, out_dir, "lm.train_lm.resume")
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train_lm(
            model, data, optimizer, steps, time_budget_s, budget_clock, batch_size, context,
            seed, device, warmup_steps, schedule, grad_clip, eval_every, eval_tokens,
            final_eval_tokens, eval_batch_size, evaluate_test, out_dir, quiet,
            checkpoint_every, resume_from, overwrite,
        )
    finally:
        torch.set_num_threads(threads_before)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _train_lm(
    model, data, optimizer, steps, time_budget_s, budget_clock, batch_size, context, seed,
    device, warmup_steps, schedule, grad_clip, eval_every, eval_tokens, final_eval_tokens,
    eval_batch_size, evaluate_test, out_dir, quiet, checkpoint_every=None, resume_from=None,
    overwrite=False,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    state = load_checkpoint(resume_from, map_location=device, kind="lm") if resume_from else None
    out = None
    if out_dir:
        in_place = resume_from is not None and resume_from.resolve() == (
            Path(out_dir) / rundir.CHECKPOINT
        ).resolve()
        out = rundir.prepare(out_dir, keep=in_place, overwrite=overwrite)
    torch.manual_seed(seed)
    corpus = data()
    info = corpus_info(corpus)
    bpt = info.get("bytes_per_token") or {}
    net = _build_model(model, corpus.vocab_size).to(device)
    context = context or getattr(net, "context", None)
    if context is None:
        raise ValueError("lm.train_lm.context is required for a model without a .context")
    opt = optimizer(net)
    coverage = _train.report_coverage(opt, quiet)
    n_params = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())

    def lr_factor(step: int) -> float:  # step = number of steps already taken
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    base_lrs = [group["lr"] for group in opt.param_groups]

    def set_lr(step: int) -> None:
        factor = lr_factor(step)
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = lr * factor

    generator = torch.Generator().manual_seed(seed)
    train_stream, valid_stream, test_stream = corpus.train, corpus.valid, corpus.test

    header = dict(
        corpus=info,
        n_params=n_params,
        context=context,
        batch_size=batch_size,
        seed=seed,
        threads=torch.get_num_threads(),
        time_budget_s=time_budget_s,
        budget_clock=budget_clock,
        **_describe_optimizer(opt),
    )
    load_start = _loadavg()
    train_time = train_cpu = 0.0
    loss_sum = torch.zeros((), device=device)
    loss_n = torch.zeros((), device=device)  # steps whose loss was finite
    loss_count = 0
    rows: list[dict[str, Any]] = []
    first_step = 1
    if state is not None:
        may_change = MAY_CHANGE_ON_RESUME + ((("train_lm", "steps"),) if schedule == "constant"
                                             else ())
        changed = changed_bindings(state["config"], config_bindings(), may_change)
        if changed:
            raise ValueError(
                f"cannot resume from {resume_from}: it was saved with other settings "
                f"({'; '.join(changed)}). A resumed run continues the same run; start a new one "
                f"(another --out, or --overwrite) to change them"
            )
        restore(resume_from, net, opt, state)
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        first_step = state["step"] + 1
        train_time, train_cpu, rows = state["train_time"], state["train_cpu"], state["rows"]
        loss_sum, loss_n = state["loss_sum"].to(device), state["loss_n"].to(device)
        loss_count = state["loss_count"]
        load_start = state["loadavg_start"]
    start = time.perf_counter() - (rows[-1]["time_s"] if rows else 0.0)
    if out:
        rundir.start(out, rows)

    def record(step: int) -> dict[str, Any]:
        nonlocal loss_sum, loss_n, loss_count
        val_loss, _ = evaluate_lm(net, valid_stream, context, eval_tokens, eval_batch_size, device)
        row = dict(
            step=step,
            tokens=step * batch_size * context,
            train_loss=float(loss_sum / loss_n) if loss_count else float("nan"),
            **lm_metrics("val", val_loss, bpt.get("valid")),
            lr=opt.param_groups[0]["lr"],
            train_time_s=train_time,
            train_cpu_s=train_cpu,
            time_s=time.perf_counter() - start,
            loadavg_1m=_loadavg(),
            corpus_fingerprint=info.get("fingerprint"),
            skipped_steps=_train.skipped_steps(opt),
        )
        loss_sum = torch.zeros((), device=device)
        loss_n = torch.zeros((), device=device)
        loss_count = 0
        rows.append(row)
        if out:
            rundir.append_jsonl(out / rundir.METRICS, row)
        return row

    def save(step: int) -> None:
        save_checkpoint(
            dict(
                kind="lm",
                step=step,
                model=net.state_dict(),
                optimizer=opt.state_dict(),
                generator=generator.get_state(),
                torch_rng=torch.get_rng_state(),
                train_time=train_time,
                train_cpu=train_cpu,
                rows=rows,
                loss_sum=loss_sum,
                loss_n=loss_n,
                loss_count=loss_count,
                loadavg_start=load_start,
                config=config_bindings(),
            ),
            out / rundir.CHECKPOINT,
        )

    def budget_spent() -> bool:
        if time_budget_s is None:
            return False
        return (train_time if budget_clock == "wall" else train_cpu) >= time_budget_s

    if not rows:
        record(0)
    bar = tqdm(total=steps, initial=first_step - 1, desc="steps", disable=quiet, leave=False)
    step = first_step - 1
    net.train()
    for step in range(first_step, steps + 1):
        tick, tick_cpu = time.perf_counter(), time.process_time()
        set_lr(step - 1)
        x, y = sample_batch(train_stream, batch_size, context, generator)
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
        finite = loss.detach().isfinite()  # a skipped batch's NaN loss is left out, on device
        loss_sum += torch.where(finite, loss.detach(), 0.0)
        loss_n += finite
        loss_count += 1
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        train_time += time.perf_counter() - tick
        train_cpu += time.process_time() - tick_cpu
        bar.update(1)
        done = step == steps or budget_spent()
        if step % eval_every == 0 or done:
            row = record(step)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")
        if checkpoint_every and step % checkpoint_every == 0:
            save(step)
        if done:
            break
    bar.close()

    final: dict[str, Any] = {}
    finals = [("val", valid_stream)] + ([("test", test_stream)] if evaluate_test else [])
    for name, stream in finals:
        loss, n = evaluate_lm(net, stream, context, final_eval_tokens, eval_batch_size, device)
        split = "valid" if name == "val" else "test"
        final.update(lm_metrics(f"final_{name}", loss, bpt.get(split)))
        final[f"final_{name}_tokens"] = n
    extra = {}
    opt_metrics = getattr(opt, "metrics", None)
    if callable(opt_metrics):
        extra = {f"opt_{k}": v for k, v in opt_metrics().items()}
    last = rows[-1]
    tokens = info.get("tokens") or {}
    summary: dict[str, Any] = dict(
        steps=step,
        train_loss=last["train_loss"],
        val_loss=final["final_val_loss"],
        val_ppl=final["final_val_ppl"],
        val_bpb=final.get("final_val_bpb"),
        test_loss=final.get("final_test_loss"),
        test_ppl=final.get("final_test_ppl"),
        test_bpb=final.get("final_test_bpb"),
        train_time_s=train_time,
        train_cpu_s=train_cpu,
        time_s=time.perf_counter() - start,
        step_time_ms=1000.0 * train_time / max(1, step),
        loadavg_start=load_start,
        loadavg_end=_loadavg(),
        corpus_fingerprint=info.get("fingerprint"),
        corpus_tokens=sum(tokens.values()) if tokens else None,
        skipped_steps=_train.skipped_steps(opt),
    )
    if out:
        detail = dict(
            summary,
            eval_tokens={k: final.get(f"final_{k}_tokens") for k in ("val", "test")},
            **extra,
            **coverage,
            run=header,
        )
        rundir.atomic_write_text(out / rundir.CONFIG, gin.operative_config_str())
        rundir.write_json(out / rundir.SUMMARY, detail)
    _train.check_outcome(summary, loss_key="val_loss")
    return summary


__all__ = ["evaluate_lm", "sample_batch", "train_lm", "windows"]



# -- study report ---------------------------------------------------------------------------------
def _read_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    summary_path, metrics_path = folder / "summary.json", folder / "metrics.jsonl"
    if not summary_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return json.loads(summary_path.read_text()), rows


def _interp(rows: list[dict[str, Any]], key: str, at: float) -> float:
    """Validation loss at ``rows[key] == at`` by linear interpolation between evaluations."""
    xs = [r[key] for r in rows]
    ys = [r["val_loss"] for r in rows]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return ys[-1]


def report(study_dir: str, sweep_dir: str | None, out_dir: str) -> str:
    """Tables (markdown, returned), CSV/JSON and plots of a study: runs named
    ``<optimizer>_seed<k>`` under ``study_dir`` and ``<optimizer>_lr<lr>`` under ``sweep_dir``."""
    import csv
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    if sweep_dir:
        sweep = []
        for folder in sorted(Path(sweep_dir).iterdir()):
            m = re.fullmatch(r"(.+)_lr(.+)", folder.name)
            run = _read_run(folder) if m else None
            if run:
                s, _ = run
                sweep.append(dict(optimizer=m.group(1), lr=float(m.group(2)), steps=s["steps"],
                                  val_loss=s["val_loss"], val_ppl=s["val_ppl"],
                                  val_bpb=s["val_bpb"], train_cpu_s=s["train_cpu_s"],
                                  loadavg=s["loadavg_start"]))
        sweep.sort(key=lambda r: (r["optimizer"], r["lr"]))
        best = {}
        for r in sweep:
            if r["optimizer"] not in best or r["val_loss"] < best[r["optimizer"]]["val_loss"]:
                best[r["optimizer"]] = r
        lines += ["| optimizer | lr | steps | val loss | val ppl | val bpb | chosen |",
                  "|---|---|---|---|---|---|---|"]
        for r in sweep:
            chosen = "**yes**" if best[r["optimizer"]] is r else ""
            lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['steps']} | {r['val_loss']:.4f} "
                         f"| {r['val_ppl']:.3f} | {r['val_bpb']:.4f} | {chosen} |")
        lines.append("")
        (out / "sweep.json").write_text(json.dumps(sweep, indent=1))

    runs: dict[str, list[tuple[int, dict[str, Any], list[dict[str, Any]]]]] = {}
    for folder in sorted(Path(study_dir).iterdir()):
        m = re.fullmatch(r"(.+)_seed(\d+)", folder.name)
        run = _read_run(folder) if m else None
        if run:
            runs.setdefault(m.group(1), []).append((int(m.group(2)), *run))
    if not runs:
        raise FileNotFoundError(f"no finished runs named <optimizer>_seed<k> under {study_dir}")
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = None
        for name, items in runs.items():
            for seed, _, rows in items:
                for r in rows:
                    row = dict(optimizer=name, seed=seed,
                               **{k: v for k, v in r.items() if k != "corpus_fingerprint"})
                    if writer is None:
                        writer = csv.DictWriter(f, fieldnames=list(row))
                        writer.writeheader()
                    writer.writerow(row)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def fmt(xs: list[float], digits: int = 3) -> str:
        spread = f" ({', '.join(f'{x:.{digits}f}' for x in xs)})" if len(xs) > 1 else ""
        return f"{mean(xs):.{digits}f}{spread}"

    table = []
    lines += ["| optimizer | steps | ms/step wall | ms/step CPU | load avg | val loss | val ppl "
              "| val bpb | test loss | test ppl | test bpb |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, items in runs.items():
        ss = [s for _, s, _ in items]

        def col(key: str, ss: list[dict[str, Any]] = ss) -> list[float]:
            return [s[key] for s in ss]

        loads = [x for s in ss for x in (s["loadavg_start"], s["loadavg_end"]) if x is not None]
        table.append(dict(optimizer=name, seeds=[seed for seed, _, _ in items],
                          **{k: col(k) for k in ("steps", "step_time_ms", "val_loss", "val_ppl",
                                                  "val_bpb", "test_loss", "test_ppl", "test_bpb",
                                                  "train_time_s", "train_cpu_s")},
                          loadavg=loads))
        cpu_ms = [1000 * s["train_cpu_s"] / s["steps"] for s in ss]
        lines.append(
            f"| {name} | {fmt(col('steps'), 0)} | {fmt(col('step_time_ms'), 0)} "
            f"| {fmt(cpu_ms, 0)} | {min(loads):.1f}–{max(loads):.1f} | {fmt(col('val_loss'))} "
            f"| {fmt(col('val_ppl'), 2)} | {fmt(col('val_bpb'))} | {fmt(col('test_loss'))} "
            f"| {fmt(col('test_ppl'), 2)} | {fmt(col('test_bpb'))} |"
        )
    lines.append("")

    # equal steps: the last periodic evaluation step that every run reached
    common_step = min(max(r["step"] for r in rows if r["step"] % 100 == 0)
                      for items in runs.values() for _, _, rows in items)
    common_cpu = min(rows[-1]["train_cpu_s"] for items in runs.values() for _, _, rows in items)
    lines += [f"| optimizer | val loss at step {common_step} | val ppl at step {common_step} "
              f"| val loss at {common_cpu:.0f} s CPU "
              f"| train time to step {common_step} (wall / CPU) |",
              "|---|---|---|---|---|"]
    equal = []
    for name, items in runs.items():
        at_step = [next(r for r in rows if r["step"] == common_step) for _, _, rows in items]
        at_cpu = [_interp(rows, "train_cpu_s", common_cpu) for _, _, rows in items]
        losses = [r["val_loss"] for r in at_step]
        equal.append(dict(optimizer=name, step=common_step, val_loss=losses,
                          cpu_s=common_cpu, val_loss_at_cpu=at_cpu))
        lines.append(
            f"| {name} | {fmt(losses)} | {fmt([math.exp(x) for x in losses], 2)} | {fmt(at_cpu)} "
            f"| {mean([r['train_time_s'] for r in at_step]):.0f} s / "
            f"{mean([r['train_cpu_s'] for r in at_step]):.0f} s |"
        )
    lines.append("")
    (out / "study.json").write_text(json.dumps(dict(final=table, equal=equal), indent=1))

    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(sorted(runs))}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, items in sorted(runs.items()):
        for i, (_seed, _, rows) in enumerate(items):
            rows = [r for r in rows if r["step"] > 0]
            label = name if i == 0 else None
            style = dict(color=colors[name], ls="-" if i == 0 else "--", label=label)
            axes[0].plot([r["train_time_s"] for r in rows], [r["val_loss"] for r in rows], **style)
            axes[1].plot([r["step"] for r in rows], [r["val_loss"] for r in rows], **style)
            axes[2].plot([r["train_cpu_s"] for r in rows], [r["val_ppl"] for r in rows], **style)
    for ax, xlabel, ylabel in zip(
        axes, ("training wall-clock (s)", "step", "training CPU time (s)"),
        ("validation loss (nats/byte)", "validation loss (nats/byte)", "validation perplexity"),
        strict=True,
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("small GPT on the stdlib byte corpus (solid: seed 0, dashed: seed 1)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    text = "\n".join(lines)
    (out / "tables.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="tables and plots of an LM study")
    parser.add_argument("study_dir")
    parser.add_argument("--sweep", default=None)
    parser.add_argument("--out", default="docs/results/lm")
    args = parser.parse_args()
    print(report(args.study_dir, args.sweep, args.out))
