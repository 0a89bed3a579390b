"""curvlab command line.

``curvlab run CONFIG.gin [--bind K=V ...] [--out DIR] [--quiet]`` trains what the config
describes; other subcommands live in their own modules and are listed in :data:`COMMANDS`.
An error ends a command with one line, ``error: ...``, naming the key, value or file, and a
non-zero exit status (2 for bad input, 1 for a run that failed); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
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

#: exception types that mean bad input (exit status 2); anything else is a failed run (1)
BAD_INPUT = (ValueError, TypeError, KeyError, LookupError, OSError, ImportError, SyntaxError)


def describe(err: BaseException, config: str | None = None) -> str:
    """The one-line message for ``err`` (see :func:`curvlab.config.explain_error`)."""
    from curvlab.config import explain_error

    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    text = explain_error(err, config)
    if not isinstance(err, BAD_INPUT + (RuntimeError,)):
        text = f"{type(err).__name__}: {text}"
    if not (is_bad_input(err) or _is_reported_failure(err)):
        text += " (an unexpected error: rerun with --debug for the traceback)"
    return text


def is_bad_input(err: BaseException) -> bool:
    # gin reports missing required bindings as a RuntimeError
    return isinstance(err, BAD_INPUT) or str(err).startswith("Required bindings")


def _is_reported_failure(err: BaseException) -> bool:
    from curvlab.experiments.distributed import DistributedTimeoutError
    from curvlab.experiments.rundir import RunFailed

    return isinstance(err, (RunFailed, DistributedTimeoutError))


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
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        if not any("--debug" in action.option_strings for action in command._actions):
            command.add_argument(
                "--debug", action="store_true", help="on an error, show the full traceback"
            )
    args = parser.parse_args(argv)
    try:
        return int(available[args.command].main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line per error; --debug re-raises
        if getattr(args, "debug", False):
            raise
        message = describe(err, getattr(args, "config", None))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not message.startswith("rank "):
            message = f"rank {os.environ.get('RANK', '?')}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 2 if is_bad_input(err) else 1


if __name__ == "__main__":
    sys.exit(main())
