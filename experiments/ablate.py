"""``curvlab ablate GRID.gin``: run named variants × seeds, then write a table and plots.

A grid is a .gin file that binds ``ablate``::

    ablate.base = "configs/digits_adafisher.gin"      # the run every variant starts from
    ablate.seeds = [0, 1, 2]                           # bound to train.seed
    ablate.bindings = ["train.epochs = 15"]            # common to every run (optional)
    ablate.variants = {
        "adafisher": [],                               # the base as it is
        "sqrt": ["ablations/sqrt.gin"],                # a .gin file, included after the base
        "adam": [                                      # gin bindings
            "train.optimizer = @baselines.torch_optimizer",
            "baselines.torch_optimizer.name = 'Adam'",
        ],
    }

Each variant is a list of items; an item ending in ``.gin`` is a config file (found as given, next
to the grid file, in the repository or in configs/) and is included, anything else is a gin line.
A run parses, in this order: the base, ``ablate.bindings``, the variant's items, ``train.seed``,
then ``--run-bind`` from the command line (so later entries win). Beware that the ablation files
include ``adafisher.gin`` again, which resets every ``optimizer.*`` binding to that file's value:
put an optimizer setting shared by all variants into each variant, not into the base.
Without ``ablate.base`` the first item of each variant must be a .gin file and serves as its base.

Each run is its own process (``python -m curvlab run CONFIG --bind ... --out OUT/VARIANT/seed_K
--quiet``), one at a time or ``--jobs N`` at once (each with ``cpu_count / N`` threads unless
``OMP_NUM_THREADS`` is set), and leaves metrics.jsonl, operative_config.gin, summary.json, run.json
(what was run) and log.txt in its directory. A run whose summary.json exists and whose run.json
matches is skipped, so an interrupted grid resumes where it stopped. The grid then writes
``results.csv`` (one row per run), ``results.md`` (mean ± sample std over seeds of the final
epoch) and four PNGs (training loss and test accuracy against epoch and against training time,
one line per variant, mean over seeds) into OUT.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gin

from curvlab.config import resolve_config
from curvlab.experiments.grid_names import (  # noqa: F401 - NAME is part of this interface
    NAME,
    check_variant_names,
    duplicate_variant_names,
)
from curvlab.validation import ConfigError, check_positive_int

#: per-run columns of results.csv (after variant, seed, status)
METRICS = ("epoch", "train_loss", "test_loss", "test_accuracy", "train_time_s", "time_s")
#: (column, title, scale, digits) of results.md
TABLE = (
    ("test_accuracy", "test accuracy (%)", 100.0, 2),
    ("test_loss", "test loss", 1.0, 4),
    ("train_loss", "train loss", 1.0, 4),
    ("train_time_s", "train time (s)", 1.0, 1),
    ("time_s", "wall time (s)", 1.0, 1),
)
#: (file stem, y column, y label, x column, x label, log y)
PLOTS = (
    ("train_loss_vs_epoch", "train_loss", "training loss", "epoch", "epoch", True),
    ("test_accuracy_vs_epoch", "test_accuracy", "test accuracy", "epoch", "epoch", False),
    ("train_loss_vs_time", "train_loss", "training loss", "train_time_s",
     "training wall-clock time (s)", True),
    ("test_accuracy_vs_time", "test_accuracy", "test accuracy", "train_time_s",
     "training wall-clock time (s)", False),
)


# -- the grid -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One (variant, seed) cell: what ``curvlab run`` gets and where it writes."""

    variant: str
    seed: int
    config: str
    bindings: tuple[str, ...]
    out: Path

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "curvlab", "run", self.config]
        for b in self.bindings:
            cmd += ["--bind", b]
        # a cell runs only when it is unfinished or stale: what is in its folder is replaced
        return [*cmd, "--overwrite", "--out", str(self.out), "--quiet"]

    def record(self) -> dict[str, Any]:
        """What identifies the run (stored as run.json; a change makes the run stale)."""
        return dict(variant=self.variant, seed=self.seed, config=self.config,
                    bindings=list(self.bindings))

    def is_done(self) -> bool:
        """summary.json exists and run.json records the same config and bindings."""
        if not (self.out / "summary.json").is_file():
            return False
        try:
            return json.loads((self.out / "run.json").read_text()) == self.record()
        except (OSError, ValueError):
            return False


@dataclass(frozen=True)
class Grid:
    """Variants × seeds; ``variants`` maps a name to its items (.gin paths or gin lines)."""

    variants: dict[str, tuple[str, ...]]
    seeds: tuple[int, ...] = (0, 1, 2)
    base: str | None = None
    bindings: tuple[str, ...] = ()
    directory: Path = field(default_factory=Path.cwd)  # where the grid file lies

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("ablate.variants is empty: name at least one variant")
        check_variant_names(self.variants)
        for name, items in self.variants.items():
            if isinstance(items, str):
                raise ValueError(
                    f"variant {name!r}: give a list of items, not the string {items!r}"
                )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"ablate.seeds must be distinct and non-empty, got {self.seeds}")

    def _path(self, item: str) -> str:
        for candidate in (Path(item), self.directory / item):
            if candidate.is_file():
                return str(candidate.resolve())
        return str(resolve_config(item))  # repository / configs/, or a helpful error

    def runs(self, out: str | os.PathLike, extra: Sequence[str] = ()) -> list[Run]:
        """Every (variant, seed) run, variants in grid order, seeds inner."""
        out = Path(out)
        runs = []
        for name, items in self.variants.items():
            items = list(items)
            if self.base is not None:
                config = self._path(self.base)
            elif items and _is_config_file(items[0]):
                config = self._path(items.pop(0))
            else:
                raise ValueError(
                    f"variant {name!r} has no config: set ablate.base or start the variant "
                    f"with a .gin file"
                )
            lines = [*self.bindings]
            lines += [f"include '{self._path(i)}'" if _is_config_file(i) else i for i in items]
            for seed in self.seeds:
                bindings = (*lines, f"train.seed = {seed}", *extra)
                runs.append(Run(name, seed, config, bindings, out / name / f"seed_{seed}"))
        return runs


def _is_config_file(item: str) -> bool:
    return item.strip().endswith(".gin") and "=" not in item and not item.startswith("include")


@gin.configurable("ablate")
def grid(
    variants: dict[str, Sequence[str]] = gin.REQUIRED,
    seeds: Sequence[int] = (0, 1, 2),
    base: str | None = None,
    bindings: Sequence[str] = (),
    directory: Path | None = None,
) -> Grid:
    """The grid a .gin file binds (``ablate.variants``, ``ablate.seeds``, ...)."""
    return Grid(
        {str(k): tuple(v) if not isinstance(v, str) else v for k, v in variants.items()},
        tuple(int(s) for s in seeds),
        base,
        tuple(bindings),
        directory or Path.cwd(),
    )


def load_grid(path: str | os.PathLike, bindings: Sequence[str] = ()) -> Grid:
    """Parse a grid .gin file (plus gin ``bindings``); gin is cleared afterwards."""
    from curvlab.config import parse_config

    try:
        config = parse_config(path, bindings)
        if config is not None:
            duplicates = duplicate_variant_names(config.read_text(), bindings)
            if duplicates:
                raise ConfigError(
                    f"{path}: ablate.variants names {', '.join(map(repr, duplicates))} more than "
                    f"once; a later entry would silently replace the earlier one: rename them"
                )
        return grid(directory=config.parent if config else None)
    finally:
        gin.clear_config()


# -- running --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    run: Run
    status: str  # "done" (ran now), "skipped" (finished earlier), "failed"
    seconds: float = 0.0
    returncode: int = 0


def execute(run: Run, threads: int | None = None) -> Outcome:
    """Run one cell in a subprocess; its output goes to ``run.out / "log.txt"``."""
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "summary.json").unlink(missing_ok=True)
    (run.out / "run.json").write_text(json.dumps(run.record(), indent=2))
    env = os.environ.copy()
    if threads is not None and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(run.out / "log.txt", "w") as log:
        log.write("$ " + shlex.join(run.command()) + "\n")
        log.flush()
        proc = subprocess.run(run.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    ok = proc.returncode == 0 and (run.out / "summary.json").is_file()
    return Outcome(run, "done" if ok else "failed", seconds, proc.returncode)


def run_grid(
    runs: Sequence[Run],
    jobs: int = 1,
    quiet: bool = False,
    force: bool = False,
    threads: int | None = None,
) -> list[Outcome]:
    """Run every unfinished cell, ``jobs`` at a time; finished ones are skipped unless ``force``.

    Each run gets ``threads`` torch threads (default ``cpu_count // jobs``) through
    ``OMP_NUM_THREADS`` unless that is already set: more threads than cores makes OpenMP spin,
    which slowed the digits job tenfold on a loaded 2-core machine.
    """
    from tqdm.auto import tqdm

    outcomes = {r: Outcome(r, "skipped") for r in runs if not force and r.is_done()}
    todo = [r for r in runs if r not in outcomes]
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    bar = tqdm(total=len(runs), initial=len(outcomes), desc="runs", unit="run", disable=quiet)
    if outcomes and not quiet:
        bar.write(f"skipping {len(outcomes)} finished run(s)")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(execute, r, threads) for r in todo]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[outcome.run] = outcome
            bar.update(1)
            r = outcome.run
            if outcome.status == "failed":
                bar.write(
                    f"FAILED {r.variant} seed {r.seed} (exit {outcome.returncode}), "
                    f"see {r.out / 'log.txt'}"
                )
            elif not quiet:
                bar.write(f"{r.variant} seed {r.seed}: {outcome.seconds:.1f} s")
    bar.close()
    return [outcomes[r] for r in runs]


# -- results --------------------------------------------------------------------------------------
def metric(value: Any) -> float:
    """A metric as a float: ``null`` (rundir writes NaN and ±inf so, e.g. the loss of a run that
    diverged) and an empty CSV cell read as NaN, so a diverged run shows as ``nan`` in the tables
    and as a gap in the curves instead of stopping the report."""
    return math.nan if value is None or value == "" else float(value)


def read_history(run: Run) -> list[dict[str, float]]:
    """The run's metrics.jsonl rows, every metric a float (:func:`metric`)."""
    path = run.out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: metric(v) if k in METRICS else v for k, v in row.items()} for row in rows]


def collect(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: its final summary (empty metrics when it has not finished)."""
    rows = []
    for r in runs:
        summary = {}
        if r.is_done():
            summary = json.loads((r.out / "summary.json").read_text())
        row: dict[str, Any] = dict(variant=r.variant, seed=r.seed,
                                   status="ok" if summary else "missing")
        row.update({k: summary.get(k, "") for k in METRICS})
        row["out_dir"] = str(r.out)
        rows.append(row)
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "seed", "status", *METRICS, "out_dir"])
        writer.writeheader()
        writer.writerows(rows)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """variant → {"runs": n finished, column: (mean, std)} over finished seeds, grid order."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = out.setdefault(row["variant"], {"runs": 0, "_values": {}})
        if row["status"] != "ok":
            continue
        entry["runs"] += 1
        for key in METRICS:
            entry["_values"].setdefault(key, []).append(metric(row[key]))
    for entry in out.values():
        values = entry.pop("_values")
        for key, vs in values.items():
            entry[key] = mean_std(vs)
    return out


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table, one line per variant: mean ± std over seeds of the final epoch; the best
    mean test accuracy is in bold."""
    stats = summarize(rows)
    seeds = {}
    for row in rows:
        seeds[row["variant"]] = seeds.get(row["variant"], 0) + 1
    finished = [s["test_accuracy"][0] for s in stats.values() if "test_accuracy" in s]
    best = max(finished) if finished else None
    head = ["variant", "runs", *(title for _, title, _, _ in TABLE), "epochs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, s in stats.items():
        cells = [f"`{variant}`", f"{s['runs']}/{seeds[variant]}"]
        for key, _, scale, digits in TABLE:
            if key not in s:
                cells.append("—")
                continue
            mean, std = s[key]
            cell = f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
            if key == "test_accuracy" and mean == best:
                cell = f"**{cell}**"
            cells.append(cell)
        cells.append(f"{s['epoch'][0]:g}" if "epoch" in s else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(
    grid_: Grid, runs: Sequence[Run], rows: Sequence[dict[str, Any]], path: Path,
    title: str, command: str | None = None,
) -> None:
    seeds = ", ".join(map(str, grid_.seeds))
    text = [
        f"# {title}\n",
        f"{len(grid_.variants)} variants × {len(grid_.seeds)} seed(s) ({seeds}); final epoch, "
        "mean ± sample standard deviation over seeds. Times are training time (evaluation "
        "excluded) and elapsed wall time per run.\n",
    ]
    if command:
        text.append(f"Command: `{command}`\n")
    text.append(markdown_table(rows))
    text.append("\n## Variants\n")
    base = f"`{grid_.base}`" if grid_.base else "the variant's first .gin file"
    common = ", ".join(f"`{b}`" for b in grid_.bindings) or "none"
    text.append(f"Base config: {base}; bindings common to every run: {common}.\n")
    for name, items in grid_.variants.items():
        shown = "; ".join(f"`{i}`" for i in items) or "(the base as it is)"
        text.append(f"- `{name}`: {shown}")
    text.append("\nPlots: " + ", ".join(f"[{stem}]({stem}.png)" for stem, *_ in PLOTS) + ".\n")
    path.write_text("\n".join(text))


def mean_curves(
    histories: Iterable[list[dict[str, float]]], x: str, y: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per epoch over seeds: (mean x, mean y, min y, max y), truncated to the shortest history."""
    histories = [h for h in histories if h]
    if not histories:
        return [], [], [], []
    n = min(len(h) for h in histories)
    xs, ys, lo, hi = [], [], [], []
    for i in range(n):
        values = [h[i][y] for h in histories]
        xs.append(mean_std([h[i][x] for h in histories])[0])
        ys.append(mean_std(values)[0])
        lo.append(min(values))
        hi.append(max(values))
    return xs, ys, lo, hi


def write_plots(runs: Sequence[Run], out: Path, title: str = "") -> list[Path]:
    """Four PNGs (see :data:`PLOTS`), one line per variant: the mean over seeds, with a band from
    the lowest to the highest seed (a ± std band would go negative on the log-scale losses)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants: dict[str, list[list[dict[str, float]]]] = {}
    for r in runs:
        variants.setdefault(r.variant, []).append(read_history(r))
    written = []
    for stem, y, ylabel, x, xlabel, logy in PLOTS:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, (name, histories) in enumerate(variants.items()):
            xs, ys, lo, hi = mean_curves(histories, x, y)
            if not xs:
                continue
            style = ("-", "--", ":", "-.")[i // 10 % 4]
            (line,) = ax.plot(xs, ys, style, label=name, marker="." if len(xs) < 30 else None)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {ylabel} (mean over seeds, band min–max)" if title else ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def report(grid_: Grid, runs: Sequence[Run], out: Path, title: str, command: str | None) -> None:
    """results.csv, results.md and the PNGs for ``runs`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(runs)
    write_csv(rows, out / "results.csv")
    write_markdown(grid_, runs, rows, out / "results.md", title, command)
    write_plots(runs, out, title)
    (out / "grid.json").write_text(json.dumps(dict(
        base=grid_.base, seeds=list(grid_.seeds), bindings=list(grid_.bindings),
        variants={k: list(v) for k, v in grid_.variants.items()}, command=command,
    ), indent=2))


# -- command line ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="a grid .gin file (e.g. configs/ablations/paper_components.gin)")
    p.add_argument("--out", default=None,
                   help="output directory (default: runs/ablate/<grid file name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--bind", action="append", default=[], metavar="BINDING",
                   help="gin binding for the grid itself, e.g. --bind 'ablate.seeds=[0]'")
    p.add_argument("--run-bind", action="append", default=[], metavar="BINDING",
                   help="gin binding appended to every run, e.g. --run-bind train.epochs=2")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: cpu count / jobs)")
    p.add_argument("--force", action="store_true", help="rerun finished runs too")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; tabulate and plot what has finished")
    p.add_argument("--quiet", action="store_true", help="no progress bar, final lines only")


def command_line(args: argparse.Namespace) -> str:
    parts = ["curvlab", "ablate", args.grid]
    if args.out:
        parts += ["--out", args.out]
    if args.jobs != 1:
        parts += ["--jobs", str(args.jobs)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    for b in args.bind:
        parts += ["--bind", b]
    for b in args.run_bind:
        parts += ["--run-bind", b]
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    check_positive_int("--jobs", args.jobs)
    if args.threads is not None:
        check_positive_int("--threads", args.threads)
    grid_ = load_grid(args.grid, args.bind)
    stem = Path(args.grid).stem
    out = Path(args.out) if args.out else Path("runs") / "ablate" / stem
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output directory {out}: {err.strerror}") from None
    runs = grid_.runs(out, args.run_bind)
    outcomes = [] if args.report_only else run_grid(
        runs, args.jobs, args.quiet, args.force, args.threads
    )
    report(grid_, runs, out, stem, command_line(args))
    failed = [o for o in outcomes if o.status == "failed"]
    ran = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    if not args.quiet:
        print(markdown_table(collect(runs)), end="")
    print(
        f"ablate: {len(runs)} runs ({ran} ran, {skipped} skipped, {len(failed)} failed); "
        f"results in {out / 'results.md'}"
    )
    return 1 if failed else 0
