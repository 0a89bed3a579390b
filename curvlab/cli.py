"""curvlab command line.

``curvlab run CONFIG.gin [--bind K=V ...] [--out DIR] [--quiet]`` trains what the config
describes; other subcommands live in their own modules and are listed in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand → (module, help). Each module defines ``add_arguments(parser)`` and ``main(args)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("curvlab.experiments.runner", "train the model a .gin config describes"),
    "ablate": (
        "curvlab.experiments.ablate",
        "run a grid of variants × seeds, write tables and plots",
    ),
    "bench": ("curvlab.experiments.bench", "time a training step per optimizer, write JSON"),
    "check-curvature": (
        "curvlab.experiments.check_curvature",
        "compare native factors with BackPACK / ASDL per layer",
    ),
    "analyze": ("curvlab.experiments.analyses", "paper analyses (diagonal concentration, ...)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    available = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # a subcommand whose module is not part of this build
        available[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(available[args.command].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
