"""The output directory of a run (``--out``): what is in it, and writing it safely.

A run writes ``metrics.jsonl`` (one JSON line per epoch or evaluation), ``summary.json``
(written last: present only once the run finished), ``operative_config.gin`` and, with
checkpoints, ``checkpoint.pt``. A fresh run refuses a directory that already holds these files
unless it is told to replace them (``--overwrite``); a resumed run continues them.

JSON written here is strict (``allow_nan=False``): NaN and ±inf become ``null``, so every file
parses with any JSON reader.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from curvlab.experiments.checkpoint import atomic_write_text, temporary_files
from curvlab.validation import ConfigError

METRICS, SUMMARY, CONFIG, CHECKPOINT = (
    "metrics.jsonl",
    "summary.json",
    "operative_config.gin",
    "checkpoint.pt",
)
RUN_FILES = (METRICS, SUMMARY, CONFIG, CHECKPOINT)


def prepare(out: str | os.PathLike, *, keep: bool = False, overwrite: bool = False) -> Path:
    """Create ``out`` and make sure this run may write into it.

    ``keep``: the run continues the files there (a resume from ``out/checkpoint.pt``).
    Otherwise existing run files are an error, or with ``overwrite`` they are removed.
    Raises :class:`ConfigError` naming the directory. Nothing in the directory changes
    until :func:`start` but leftovers of killed writes (and, with ``overwrite``, the old run).
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create the output directory {out}: {err.strerror or err}"
        ) from None
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write into the output directory {out}: {err.strerror}") from None
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not keep:
        if not overwrite:
            raise ConfigError(
                f"{out} already holds a run ({', '.join(existing)}); pass --overwrite to replace "
                f"it, --bind train.resume=True to continue it from its checkpoint, or choose "
                f"another --out"
            )
        for name in existing:
            (out / name).unlink()
    for name in RUN_FILES:  # leftovers of a write that was killed
        for tmp in temporary_files(out / name):
            tmp.unlink(missing_ok=True)
    return out


def start(out: Path, history: list[dict[str, Any]]) -> None:
    """Training begins: ``metrics.jsonl`` holds exactly the rows of ``history`` (those of the
    checkpoint a run resumes from: epochs after it are run and logged again) and no
    ``summary.json`` (present only once the run finished)."""
    (out / SUMMARY).unlink(missing_ok=True)
    write_jsonl(out / METRICS, history)


def finite(value: Any) -> Any:
    """``value`` with every NaN or ±inf float replaced by ``None`` (JSON ``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON of ``value`` (non-finite floats as ``null``)."""
    return json.dumps(finite(value), allow_nan=False, indent=indent)


def write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, dumps(value, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(dumps(row) + "\n" for row in rows))


def append_jsonl(path: str | os.PathLike, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(dumps(row) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class RunFailed(RuntimeError):
    """The run ended, but its result is not usable (every step skipped, a non-finite final
    loss); its files, summary.json included, record what happened."""
