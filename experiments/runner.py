"""``curvlab run CONFIG.gin``: parse the config and call its task (``run.task``)."""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Callable

import gin

from curvlab.experiments.train import train


@gin.configurable(module="run")
def task(fn: Callable[..., dict] = train) -> Callable[..., dict]:
    """The training function a config runs (``run.task.fn = @train_lm`` for language models)."""
    return fn


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="path to a .gin file (e.g. configs/digits_adafisher.gin)")
    p.add_argument(
        "--bind", action="append", default=[], metavar="KEY=VALUE",
        help="extra gin binding, e.g. --bind optimizer.lr=0.01 (repeatable)",
    )
    p.add_argument(
        "--out", default=None,
        help="directory for metrics.jsonl, summary.json, operative_config.gin",
    )
    p.add_argument(
        "--plugins", action="append", default=[], metavar="FILE.py",
        help="import a plugin file (it registers itself) before parsing the config (repeatable)",
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace the run already in --out (otherwise such a directory is refused; "
        "--bind train.resume=True continues it instead)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, final line only")


def main(args: argparse.Namespace) -> int:
    from curvlab.config import parse_config

    parse_config(args.config, args.bind, plugins=args.plugins)
    fn = task()
    kwargs = dict(out_dir=args.out, quiet=args.quiet)
    if args.overwrite:
        if not _accepts(fn, "overwrite"):
            raise ValueError(f"--overwrite: the task {fn!r} has no `overwrite` argument")
        kwargs["overwrite"] = True
    summary = fn(**kwargs)
    shown = " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print(f"final: {shown}" + (f" out={args.out}" if args.out else ""))
    return 0


def _accepts(fn: Callable[..., object], name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())
