"""The MNIST-1D study (docs/results/mnist1d.md) in stages, on top of ``curvlab ablate``.

    python -m curvlab.experiments.mnist1d_study sweep  --study cnn --jobs 2  # lr on validation
    python -m curvlab.experiments.mnist1d_study select --study cnn           # -> mnist1d_lr.gin
    python -m curvlab.experiments.mnist1d_study steps  --study cnn --jobs 2  # equal steps
    python -m curvlab.experiments.mnist1d_study time   --study cnn           # equal wall-clock
    python -m curvlab.experiments.mnist1d_study estimate --study cnn --from runs/pilot/cnn/steps

A study (``--study``, repeatable: cnn, gru, norm) is a component grid in configs/ablations/
(``mnist1d_components.gin``, ``mnist1d_gru.gin``, ``mnist1d_norm.gin``) and, for cnn and gru, a
learning-rate sweep on the validation split (``mnist1d_lr_sweep.gin``, ``mnist1d_gru_lr_sweep.gin``,
variants ``<variant>_lr<lr>``). ``select`` picks, per variant, the learning rate with the highest
mean final validation accuracy (ties: lower validation loss; an lr counts only when every seed
finished) and writes it as the macro ``LR_<STUDY>_<VARIANT>`` into ``--lr-file`` (default
configs/ablations/mnist1d_lr.gin, which the grids include), with ``# status <study>: selected``;
``steps`` and ``time`` refuse a study whose rates are still provisional unless ``--provisional``.
The macros are passed to every run as explicit bindings, so a changed rate makes the run stale.

``time`` is the wall-clock protocol (``train.time_budget_from``/``time_budget_epochs``): per seed a
block, run one at a time, of the reference variant (``--reference``, default adam) at the full
protocol, then every other variant with the reference's training time as its budget
(``train.epochs`` raised 10x as an upper bound). Each run's machine load is recorded in its
``load.json`` (runnable tasks sampled from /proc/loadavg every second; the 1-min load average);
a block in which any run saw a mean above ``--max-load`` (default: the CPU count) is repeated,
up to ``--repeats`` times, and the least loaded block is reported (all attempts stay on disk and
in ``load.md``). Output: ``OUT/<study>/{sweep,steps,time}/`` with ablate's results.csv,
results.md and plots (curves against epoch and against training time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from curvlab.config import CONFIG_ROOT
from curvlab.experiments import ablate

DEFAULT_OUT = Path("runs") / "mnist1d"
DEFAULT_LR_FILE = CONFIG_ROOT / "ablations" / "mnist1d_lr.gin"
LR_LINE = re.compile(r"^(LR_[A-Z0-9_]+)\s*=\s*(\S+)")
STATUS_LINE = re.compile(r"^# status (\w+): (selected|provisional)")


@dataclass(frozen=True)
class Study:
    grid: str
    sweep: str | None  # None: uses another study's rates
    prefix: str  # macro prefix of the rates it uses


STUDIES = {
    "cnn": Study("ablations/mnist1d_components.gin", "ablations/mnist1d_lr_sweep.gin", "LR_CNN"),
    "gru": Study("ablations/mnist1d_gru.gin", "ablations/mnist1d_gru_lr_sweep.gin", "LR_GRU"),
    "norm": Study("ablations/mnist1d_norm.gin", None, "LR_CNN"),
}


# -- learning rates -------------------------------------------------------------------------------
def read_lr_file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(macro → value text, study prefix → "selected" | "provisional")."""
    macros, status = {}, {}
    for line in path.read_text().splitlines():
        if m := LR_LINE.match(line):
            macros[m[1]] = m[2]
        elif m := STATUS_LINE.match(line):
            status[f"LR_{m[1].upper()}"] = m[2]
    return macros, status


def write_lr_file(
    path: Path, macros: dict[str, str], status: dict[str, str], notes: dict[str, str]
) -> None:
    lines = [
        "# Learning rates of the MNIST-1D study, one gin macro per (study, variant), used by",
        "# configs/ablations/mnist1d_components.gin, mnist1d_gru.gin and mnist1d_norm.gin.",
        "# Written by `python -m curvlab.experiments.mnist1d_study select` from the validation",
        "# sweeps (mnist1d_lr_sweep.gin, mnist1d_gru_lr_sweep.gin): highest mean final",
        "# validation accuracy, ties to the lower validation loss. Status \"provisional\": not",
        "# selected yet (the configs' defaults).",
    ]
    for prefix in sorted({spec.prefix for spec in STUDIES.values()} | set(status)):
        lines.append(f"# status {prefix[3:].lower()}: {status.get(prefix, 'provisional')}")
    for name, value in macros.items():
        note = f"  # {notes[name]}" if notes.get(name) else ""
        lines.append(f"{name} = {value}{note}")
    path.write_text("\n".join(lines) + "\n")


def lr_bindings(path: Path, prefix: str, allow_provisional: bool) -> list[str]:
    macros, status = read_lr_file(path)
    if status.get(prefix) != "selected" and not allow_provisional:
        raise SystemExit(
            f"{path}: the {prefix}_* learning rates are provisional; run the sweep and "
            f"`select` first, or pass --provisional"
        )
    return [f"{k} = {v}" for k, v in macros.items() if k.startswith(prefix + "_")]


@dataclass
class Choice:
    lr: str
    accuracy: tuple[float, float]
    loss: float
    at_edge: bool
    table: dict[str, tuple[float, float, float] | None]  # lr → (acc mean, acc std, loss) | None


def _lr_value(text: str) -> float:
    return float(text)


def select(rows: Sequence[dict[str, Any]]) -> dict[str, Choice]:
    """Per base variant (``<variant>_lr<lr>``): the rule of the module docstring."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        base, sep, lr = row["variant"].rpartition("_lr")
        if not sep:
            raise ValueError(f"sweep variant {row['variant']!r} is not named <variant>_lr<lr>")
        grouped.setdefault(base, {}).setdefault(lr, []).append(row)
    choices = {}
    for base, by_lr in grouped.items():
        table: dict[str, tuple[float, float, float] | None] = {}
        for lr, cells in sorted(by_lr.items(), key=lambda kv: _lr_value(kv[0])):
            if any(c["status"] != "ok" for c in cells):
                table[lr] = None
                continue
            acc = ablate.mean_std([ablate.metric(c["test_accuracy"]) for c in cells])
            loss = ablate.mean_std([ablate.metric(c["test_loss"]) for c in cells])[0]
            table[lr] = (acc[0], acc[1], loss if loss == loss else float("inf"))
        done = {lr: v for lr, v in table.items() if v is not None}
        if not done:
            continue
        top = max(v[0] for v in done.values())  # ties: equal up to rounding (accuracies are k/n)
        best = min((lr for lr in done if done[lr][0] >= top - 1e-9), key=lambda lr: done[lr][2])
        order = list(table)
        choices[base] = Choice(best, done[best][:2], done[best][2],
                               best in (order[0], order[-1]), table)
    return choices


def selection_markdown(choices: dict[str, Choice]) -> str:
    lrs = sorted({lr for c in choices.values() for lr in c.table}, key=_lr_value)
    lines = ["| variant | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for base, c in choices.items():
        cells = []
        for lr in lrs:
            if lr not in c.table:
                cell = ""
            elif (v := c.table[lr]) is None:
                cell = "failed"
            else:
                cell = f"{100 * v[0]:.2f} ± {100 * v[1]:.2f}"
            cells.append(f"**{cell}**" if lr == c.lr else cell)
        edge = " (edge of the range)" if c.at_edge else ""
        lines.append(f"| `{base}` | " + " | ".join(cells) + f" | {c.lr}{edge} |")
    return "\n".join(lines) + "\n"


def plot_sensitivity(choices: dict[str, Choice], path: Path, title: str) -> None:
    """Final validation accuracy against learning rate, one line per variant (mean, ± std)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (base, c) in enumerate(choices.items()):
        pts = [(_lr_value(lr), *v[:2]) for lr, v in c.table.items() if v is not None]
        x, y, e = zip(*pts)
        ax.errorbar(x, [100 * v for v in y], [100 * v for v in e], capsize=2, label=base,
                    linestyle=("-", "--", ":", "-.")[i // 10 % 4], marker=".")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


# -- machine load ---------------------------------------------------------------------------------
class LoadMonitor:
    """Samples the runnable-task count (/proc/loadavg, 4th field) and the 1-min load average."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def sample() -> tuple[float, float, float]:
        one_minute = os.getloadavg()[0]
        try:
            runnable = float(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            runnable = one_minute
        return time.time(), runnable, one_minute

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> dict[str, Any]:
        inside = [s for s in self.samples if start <= s[0] <= end] or [self.sample()]
        runnable = [s[1] for s in inside]
        return dict(runnable_mean=sum(runnable) / len(runnable), runnable_max=max(runnable),
                    loadavg_1min_end=inside[-1][2], samples=len(inside),
                    cpus=os.cpu_count(), process_s=end - start)


def run_with_load(
    runs: Sequence[ablate.Run], jobs: int, threads: int | None, force: bool = False
) -> list[ablate.Outcome]:
    """ablate's runner, plus a ``load.json`` per run (see :class:`LoadMonitor`)."""
    todo = [r for r in runs if force or not r.is_done()]
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, jobs))

    def one(run: ablate.Run) -> ablate.Outcome:
        start = time.time()
        outcome = ablate.execute(run, threads)
        (run.out / "load.json").write_text(json.dumps(monitor.window(start, time.time())))
        print(f"{run.variant} seed {run.seed}: {outcome.status} in {outcome.seconds:.0f} s",
              flush=True)
        return outcome

    with LoadMonitor() as monitor, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(one, todo))
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        print(f"FAILED {o.run.variant} seed {o.run.seed}: see {o.run.out / 'log.txt'}")
    return outcomes


def run_load(run: ablate.Run) -> dict[str, Any] | None:
    path = run.out / "load.json"
    return json.loads(path.read_text()) if path.is_file() else None


# -- stages ---------------------------------------------------------------------------------------
def _grid(path: str, args: argparse.Namespace, sweep: bool = False) -> ablate.Grid:
    grid = ablate.load_grid(CONFIG_ROOT / path)
    variants = grid.variants
    if args.variants:
        wanted = set(args.variants.split(","))
        key = (lambda v: v.rpartition("_lr")[0]) if sweep else (lambda v: v)
        variants = {k: v for k, v in variants.items() if key(k) in wanted}
        if not variants:
            raise SystemExit(f"--variants {args.variants}: none of them is in {path}")
    seeds = tuple(args.seeds) if args.seeds else grid.seeds
    return replace(grid, variants=variants, seeds=seeds)


def _report(grid: ablate.Grid, runs: Sequence[ablate.Run], out: Path, title: str) -> None:
    command = shlex.join(["python", "-m", "curvlab.experiments.mnist1d_study", *sys.argv[1:]])
    ablate.report(grid, runs, out, title, command)
    print(f"{title}: {out / 'results.md'}")


def stage_sweep(study: str, args: argparse.Namespace) -> None:
    spec = STUDIES[study]
    if spec.sweep is None:
        print(f"{study}: no sweep (uses the {spec.prefix} rates)")
        return
    grid = _grid(spec.sweep, args, sweep=True)
    out = args.out / study / "sweep"
    runs = grid.runs(out, args.run_bind)
    run_with_load(runs, args.jobs, args.threads, args.force)
    _report(grid, runs, out, f"mnist1d {study}: learning-rate sweep (validation split)")


def stage_select(study: str, args: argparse.Namespace) -> None:
    spec = STUDIES[study]
    if spec.sweep is None:
        return
    grid = _grid(spec.sweep, args, sweep=True)
    out = args.out / study / "sweep"
    choices = select(ablate.collect(grid.runs(out, args.run_bind)))
    if not choices:
        raise SystemExit(f"{study}: no finished sweep runs in {out}")
    (out / "selection.md").write_text(
        f"# mnist1d {study}: learning-rate selection\n\nFinal validation accuracy (%), mean ± "
        f"sample std over seeds; bold: chosen (highest mean, ties to the lower validation "
        f"loss). Runs: {out}.\n\n" + selection_markdown(choices)
    )
    plot_sensitivity(choices, out / "lr_sensitivity.png", f"mnist1d {study}: validation accuracy")
    source = args.lr_file if args.lr_file.is_file() else DEFAULT_LR_FILE
    macros, status = read_lr_file(source)
    notes = {}
    for base, c in choices.items():
        name = f"{spec.prefix}_{base.upper()}"
        macros[name] = c.lr
        notes[name] = (f"validation {100 * c.accuracy[0]:.2f} ± {100 * c.accuracy[1]:.2f} %"
                       + (", at the edge of the swept range" if c.at_edge else ""))
    missing = [v for v in ablate.load_grid(CONFIG_ROOT / spec.grid).variants
               if v.upper() not in {b.upper() for b in choices}]
    status[spec.prefix] = "provisional" if missing else "selected"
    write_lr_file(args.lr_file, macros, status, notes)
    print(selection_markdown(choices), end="")
    print(f"{study}: rates written to {args.lr_file}"
          + (f" (still provisional: no sweep for {', '.join(missing)})" if missing else ""))


def stage_steps(study: str, args: argparse.Namespace) -> None:
    spec = STUDIES[study]
    grid = _grid(spec.grid, args)
    extra = [*lr_bindings(args.lr_file, spec.prefix, args.provisional), *args.run_bind]
    out = args.out / study / "steps"
    runs = grid.runs(out, extra)
    run_with_load(runs, args.jobs, args.threads, args.force)
    _report(grid, runs, out, f"mnist1d {study}: equal steps")


def stage_time(study: str, args: argparse.Namespace) -> None:
    spec = STUDIES[study]
    grid = _grid(spec.grid, args)
    if args.reference not in grid.variants:
        raise SystemExit(f"--reference {args.reference!r} is not a variant of {spec.grid}")
    extra = [*lr_bindings(args.lr_file, spec.prefix, args.provisional), *args.run_bind]
    out = args.out / study / "time"
    max_load = args.max_load if args.max_load is not None else float(os.cpu_count() or 1)
    chosen, log = [], []
    for seed in grid.seeds:
        attempts = []
        for attempt in range(1 + args.repeats):
            block = out / "attempts" / f"seed_{seed}" / f"try_{attempt}"
            one_seed = replace(grid, seeds=(seed,))
            ref = [r for r in one_seed.runs(block, extra) if r.variant == args.reference]
            run_with_load(ref, 1, args.threads, args.force)
            if not ref[0].is_done():
                raise SystemExit(f"the reference run failed: see {ref[0].out / 'log.txt'}")
            summary = json.loads((ref[0].out / "summary.json").read_text())
            budget = [f"train.time_budget_from = '{ref[0].out}'",
                      f"train.time_budget_epochs = {summary['epoch']}",
                      f"train.epochs = {10 * summary['epoch']}"]
            others = [r for r in one_seed.runs(block, [*extra, *budget])
                      if r.variant != args.reference]
            run_with_load(others, 1, args.threads, args.force)
            block_runs = ref + others
            loads = [(run_load(r) or {}).get("runnable_mean", float("inf")) for r in block_runs]
            attempts.append((max(loads), block_runs))
            log += [(seed, attempt, r, load) for r, load in zip(block_runs, loads)]
            if max(loads) <= max_load:
                break
        chosen += min(attempts, key=lambda a: a[0])[1]
    _report(grid, chosen, out, f"mnist1d {study}: equal wall-clock (budget: {args.reference})")
    lines = ["| seed | try | variant | runnable tasks (mean) | max | 1-min load at end | chosen |",
             "|---|---|---|---|---|---|---|"]
    for seed, attempt, r, load in log:
        info = run_load(r) or {}
        lines.append(f"| {seed} | {attempt} | `{r.variant}` | {load:.2f} | "
                     f"{info.get('runnable_max', float('nan')):.0f} | "
                     f"{info.get('loadavg_1min_end', float('nan')):.2f} | "
                     f"{'yes' if r in chosen else ''} |")
    (out / "load.md").write_text(
        f"Machine load per timed run ({os.cpu_count()} CPUs; a block is repeated when a run's "
        f"mean exceeds {max_load:g}).\n\n" + "\n".join(lines) + "\n")


def _protocol_epochs(grid: ablate.Grid) -> float:
    """A sweep's length in epochs of the full training set (40 batches of 100): its
    ``train.epochs`` binding over the validation split's 3200 sequences (32 batches)."""
    found = [re.fullmatch(r"train\.epochs\s*=\s*(\d+)", b.strip()) for b in grid.bindings]
    epochs = next((int(m[1]) for m in found if m), 200)
    return epochs * 32 / 40


def stage_estimate(study: str, args: argparse.Namespace) -> None:
    """Predicted time of the full sweep and grids of ``study``, one run at a time, from the
    per-epoch training time and the start-up overhead of a finished (pilot) steps stage in
    ``--from`` (so at that pilot's machine load; variants it lacks get its slowest rate)."""
    if args.source is None:
        raise SystemExit("estimate needs --from DIR (a finished steps stage, e.g. a pilot)")
    per_epoch, overhead = {}, []
    for summary in Path(args.source).glob("*/seed_*/summary.json"):
        s, load = json.loads(summary.read_text()), json.loads(
            (summary.parent / "load.json").read_text())
        per_epoch.setdefault(summary.parent.parent.name, []).append(s["train_time_s"] / s["epoch"])
        overhead.append(load["process_s"] - s["train_time_s"])
    if not per_epoch:
        raise SystemExit(f"--from {args.source}: no finished runs with load.json")
    fixed = sum(overhead) / len(overhead)
    fallback = max(sum(v) / len(v) for v in per_epoch.values())
    def rate(variant: str) -> float:
        measured = per_epoch.get(variant, [fallback])
        return sum(measured) / len(measured)

    spec = STUDIES[study]
    stages = [("steps", spec.grid), ("time", spec.grid)]
    if spec.sweep:
        stages.insert(0, ("sweep", spec.sweep))
    total_h = 0.0
    for label, path in stages:
        grid = ablate.load_grid(CONFIG_ROOT / path)
        epochs = _protocol_epochs(grid) if label == "sweep" else 200.0
        seconds = 0.0
        for name in grid.variants:
            if label == "time":  # every run trains for the reference's time
                seconds += len(grid.seeds) * (fixed + 200 * rate(args.reference))
            else:
                base = name.rpartition("_lr")[0] if label == "sweep" else name
                seconds += len(grid.seeds) * (fixed + epochs * rate(base))
        total_h += seconds / 3600
        print(f"{study} {label}: {len(grid.variants)} variants x {len(grid.seeds)} seeds, "
              f"{seconds / 3600:.1f} h")
    print(f"{study} total: {total_h:.1f} h (one run at a time, no repeats); overhead "
          f"{fixed:.0f} s per run; measured "
          f"s/epoch: " + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in per_epoch.items()))


def _rows(path: Path) -> list[dict[str, Any]]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["status"] == "ok"]


def paired(rows: Sequence[dict[str, Any]], variant: str, reference: str,
           key: str = "test_accuracy") -> tuple[float, float, int, int] | None:
    """``variant − reference`` over the seeds both finished (same seed: same initial weights and
    batches): (mean, sample std, seeds where the variant is higher, seeds)."""
    by = {(r["variant"], r["seed"]): ablate.metric(r[key]) for r in rows}
    seeds = sorted({s for v, s in by if v == variant} & {s for v, s in by if v == reference})
    if not seeds:
        return None
    diff = [by[(variant, s)] - by[(reference, s)] for s in seeds]
    mean, std = ablate.mean_std(diff)
    return mean, std, sum(d > 0 for d in diff), len(seeds)


def summary_markdown(steps: Sequence[dict[str, Any]], timed: Sequence[dict[str, Any]],
                     rates: dict[str, str], reference: str) -> str:
    """One line per variant: final test accuracy at equal steps and at equal wall-clock (mean ±
    sample std over seeds, n), and the paired difference to ``reference``."""
    def acc(rows: Sequence[dict[str, Any]], variant: str) -> tuple[str, list[dict[str, Any]]]:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            return "—", mine
        mean, std = ablate.mean_std([ablate.metric(r["test_accuracy"]) for r in mine])
        return f"{100 * mean:.2f} ± {100 * std:.2f} ({len(mine)})", mine

    def delta(rows: Sequence[dict[str, Any]], variant: str) -> str:
        if variant == reference or (d := paired(rows, variant, reference)) is None:
            return "—"
        mean, std, wins, n = d
        return f"{100 * mean:+.2f} ± {100 * std:.2f} ({wins}/{n})"

    variants = list(dict.fromkeys([r["variant"] for r in steps] + [r["variant"] for r in timed]))
    lines = [f"| variant | lr | equal steps: test acc. % (seeds) | Δ vs {reference} (wins) | "
             f"equal wall-clock: test acc. % (seeds) | Δ vs {reference} (wins) | "
             f"epochs in the budget |", "|---|---|---|---|---|---|---|"]
    for v in variants:
        a_steps, _ = acc(steps, v)
        a_time, mine = acc(timed, v)
        epochs = (f"{ablate.mean_std([float(r['epoch']) for r in mine])[0]:.0f}"
                  if mine else "—")
        lines.append(f"| `{v}` | {rates.get(v, '—')} | {a_steps} | {delta(steps, v)} | "
                     f"{a_time} | {delta(timed, v)} | {epochs} |")
    return "\n".join(lines) + "\n"


def plot_steps(runs_dir: Path, variants: Sequence[str], path: Path, title: str,
               per_epoch: int = 40) -> None:
    """Test accuracy against optimizer steps (epoch × batches per epoch), mean over seeds with a
    min–max band, one line per variant; the y axis starts at the worst final mean − 5 points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finals = []
    for i, variant in enumerate(variants):
        histories = []
        for metrics in sorted((runs_dir / variant).glob("seed_*/metrics.jsonl")):
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            histories.append(rows)
        xs, ys, lo, hi = ablate.mean_curves(histories, "epoch", "test_accuracy")
        if not xs:
            continue
        steps = [per_epoch * x for x in xs]
        (line,) = ax.plot(steps, [100 * y for y in ys], ("-", "--", ":", "-.")[i // 10 % 4],
                          label=f"{variant} ({len(histories)})")
        ax.fill_between(steps, [100 * y for y in lo], [100 * y for y in hi],
                        color=line.get_color(), alpha=0.12, linewidth=0)
        finals.append(100 * ys[-1])
    if finals:
        ax.set_ylim(max(0.0, min(finals) - 5), 100)
    ax.set_xlabel("optimizer steps (batch 100)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title} (mean over seeds, band min–max)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.savefig(path, dpi=110)


def stage_report(study: str, args: argparse.Namespace) -> None:
    """``OUT/<study>/summary.md``: the equal-steps and equal-wall-clock tables side by side, with
    paired differences to ``--reference``; ``test_accuracy_vs_step.png`` of the steps stage."""
    spec = STUDIES[study]
    root = args.out / study
    steps, timed = _rows(root / "steps" / "results.csv"), _rows(root / "time" / "results.csv")
    if not steps and not timed:
        raise SystemExit(f"{study}: no finished steps or time stage under {root}")
    macros, status = read_lr_file(args.lr_file)
    variants = ablate.load_grid(CONFIG_ROOT / spec.grid).variants
    rates = {v: macros.get(m[1], "?") for v, items in variants.items()
             for i in items if (m := re.search(r"%(LR_\w+)", i))}
    text = (f"# mnist1d {study}: equal steps and equal wall-clock\n\nFinal test accuracy, "
            f"mean ± sample std over seeds (number of seeds); Δ: the paired difference to "
            f"`{args.reference}` over the same seeds (same initial weights, same batches), mean ± "
            f"std, and in how many seeds the variant was higher. Learning rates: {args.lr_file} "
            f"(status {status.get(spec.prefix, '?')}). Equal wall-clock: every variant trains "
            f"for the training time `{args.reference}` took for the full protocol in the same "
            f"block (see time/load.md).\n\n"
            + summary_markdown(steps, timed, rates, args.reference))
    (root / "summary.md").write_text(text)
    if (root / "steps").is_dir():
        plot_steps(root / "steps", list(variants), root / "steps" / "test_accuracy_vs_step.png",
                   f"mnist1d {study}: equal steps")
    print(text, end="")


STAGES = {"sweep": stage_sweep, "select": stage_select, "steps": stage_steps,
          "time": stage_time, "estimate": stage_estimate, "report": stage_report}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m curvlab.experiments.mnist1d_study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--study", action="append", choices=list(STUDIES),
                   help="repeatable (default: cnn, gru, norm)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--lr-file", type=Path, default=DEFAULT_LR_FILE)
    p.add_argument("--variants", help="comma-separated subset of the grid's variants")
    p.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    p.add_argument("--run-bind", action="append", default=[], metavar="BINDING",
                   help="gin binding appended to every run (e.g. train.epochs=5 for a pilot)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (not for `time`)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--provisional", action="store_true", help="allow unselected learning rates")
    p.add_argument("--reference", default="adam", help="`time`: the variant giving the budget")
    p.add_argument("--max-load", type=float, default=None,
                   help="`time`: repeat a block above this mean runnable-task count (CPU count)")
    p.add_argument("--repeats", type=int, default=1, help="`time`: extra attempts per block")
    p.add_argument("--from", dest="source", default=None, help="`estimate`: a steps directory")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.repeats < 0:
        raise SystemExit(f"--jobs must be >= 1 and --repeats >= 0, got {args.jobs}, {args.repeats}")
    for study in args.study or list(STUDIES):
        STAGES[args.stage](study, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
