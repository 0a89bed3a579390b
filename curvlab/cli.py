"""``curvlab`` command line: ``curvlab run CONFIG.gin [--bind K=V ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train the model a .gin config describes")
    p.add_argument("config", help="path to a .gin file (e.g. configs/digits_adafisher.gin)")
    p.add_argument(
        "--bind", action="append", default=[], metavar="KEY=VALUE",
        help="extra gin binding, e.g. --bind optimizer.lr=0.01 (repeatable)",
    )
    p.add_argument("--out", default=None, help="directory for metrics.jsonl and operative_config.gin")
    p.add_argument("--quiet", action="store_true", help="no progress bar, final line only")


def _run(args: argparse.Namespace) -> int:
    from curvlab.config import parse_config
    from curvlab.experiments.train import train

    parse_config(args.config, args.bind)
    summary = train(out_dir=args.out, quiet=args.quiet)
    print(
        f"final: test_accuracy={summary['test_accuracy']:.4f} test_loss={summary['test_loss']:.4f} "
        f"train_loss={summary['train_loss']:.4f} time={summary['time_s']:.1f}s"
        + (f" out={args.out}" if args.out else "")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    args = parser.parse_args(argv)
    handlers = {"run": _run}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
