"""Checkpoints of a training run (``curvlab run`` and the language-model runner).

Writing is atomic: the checkpoint goes to a temporary file in the same directory, is flushed
and fsync'ed, and then replaces ``checkpoint.pt`` with ``os.replace``; the directory is
fsync'ed last. A crash or a SIGKILL at any moment leaves either the previous checkpoint or the
new one, never a mixture (a partly written ``.checkpoint.pt.*.tmp`` may stay behind; the next
run in that directory removes it).

Reading never runs code: ``torch.load(weights_only=True)`` accepts tensors and plain containers
only (a checkpoint is therefore plain data: state dicts, RNG states as tensors, the metric
history, the gin bindings). A truncated, empty, foreign or crafted file is a
:class:`CheckpointError` naming the file (docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import gin
import torch

from curvlab.validation import ConfigError

#: version of the checkpoint layout written by this module
FORMAT = 1
#: test-only fault injection (tests/faults): "N:MARKER" pauses the N-th checkpoint save of the
#: process once part of the temporary file is written, after creating the file MARKER
PAUSE_ENV = "CURVLAB_TEST_PAUSE_IN_SAVE"
_saves = 0


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, truncated, foreign, or holding code)."""


# -- atomic files ---------------------------------------------------------------------------------
def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_files(path: Path) -> list[Path]:
    """Leftovers of interrupted atomic writes of ``path``."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then replace ``path`` by it.

    Until the final ``os.replace`` the previous ``path`` is untouched; the temporary file is
    flushed and fsync'ed first, and the directory afterwards.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # not mkstemp: its files are mode 0600, a checkpoint should follow the umask like any file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class _PausingWriter:
    """Fault injection for tests: pauses (for a SIGKILL) once the file is partly written."""

    def __init__(self, file: BinaryIO, marker: Path) -> None:
        self.file, self.marker, self.written = file, marker, 0

    def write(self, data: bytes) -> int:
        if self.written >= 4096:  # some records are on disk, more are to come
            self.file.flush()
            os.fsync(self.file.fileno())
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)
        n = self.file.write(data)
        self.written += len(data)
        return n

    def flush(self) -> None:
        self.file.flush()


def _writer(file: BinaryIO) -> BinaryIO | _PausingWriter:
    global _saves
    _saves += 1
    spec = os.environ.get(PAUSE_ENV)
    if spec:
        count, _, marker = spec.partition(":")
        if int(count) == _saves:
            return _PausingWriter(file, Path(marker))
    return file


# -- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` (plain data and tensors only) atomically to ``path``."""
    state = dict(state, format=FORMAT)
    atomic_write(path, lambda f: torch.save(state, _writer(f)))


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _reason(err: BaseException) -> str:
    """The informative part of a load error (torch's weights_only message wraps it in advice
    to load with ``weights_only=False``, which this module never does)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = None, kind: str = "train"
) -> dict[str, Any]:
    """The state a :func:`save_checkpoint` of a ``kind`` run wrote to ``path``.

    Raises :class:`CheckpointError` (one line, naming the file) for a missing, empty, truncated
    or foreign file, and for one that would need to unpickle anything but tensors and plain
    containers (``weights_only=True``: nothing in it is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a broken file
        found = _UNSUPPORTED_GLOBAL.search(str(err))
        if isinstance(err, pickle.UnpicklingError) and found:
            raise CheckpointError(
                f"checkpoint {path} holds more than tensors and plain data (it refers to "
                f"{found.group(1)}); it was not loaded: checkpoints are read with "
                f"torch.load(weights_only=True) and never run code (docs/security.md)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is truncated, corrupt or not a torch file "
            f"({_reason(err)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("kind") != kind:
        found = (
            f"format {state.get('format')!r}, kind {state.get('kind')!r}"
            if isinstance(state, dict)
            else type(state).__name__
        )
        raise CheckpointError(
            f"checkpoint {path} is not a checkpoint of a `{kind}` run written by this version of "
            f"curvlab ({found}; expected format {FORMAT}, kind {kind!r})"
        )
    return state


# -- the configuration a checkpoint was written with -----------------------------------------------
def config_bindings() -> dict[str, str]:
    """The operative gin configuration as ``{"configurable.parameter": value text}``."""
    text = gin.operative_config_str(max_line_length=1_000_000)  # one line per binding
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "import ", "from ")) or " = " not in line:
            continue
        key, value = line.split(" = ", 1)
        out[key.strip()] = value.strip()
    return out


def changed_bindings(
    saved: dict[str, str], current: dict[str, str], may_change: Iterable[tuple[str, str]]
) -> list[str]:
    """``key: saved -> current`` for every binding that differs, except ``may_change``
    (pairs of configurable name and parameter, e.g. ``("train", "epochs")``)."""
    allowed = set(may_change)
    out = []
    for key in sorted(set(saved) | set(current)):
        selector, _, parameter = key.rpartition(".")
        if (selector.rpartition("/")[2].rpartition(".")[2], parameter) in allowed:
            continue
        before, now = saved.get(key, "(not used)"), current.get(key, "(not used)")
        if before != now:
            out.append(f"{key}: {before} -> {now}")
    return out


def resume_path(
    resume: bool | str | os.PathLike | None, out_dir: str | os.PathLike | None, key: str
) -> Path | None:
    """The checkpoint a run continues from: ``None`` for a fresh run (``resume`` False/None),
    ``out_dir/checkpoint.pt`` for ``True``, or the file ``resume`` names (a run directory
    stands for its checkpoint.pt). ``key`` names the setting in errors (``train.resume``).
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        if out_dir is None:
            raise ConfigError(
                f"{key} = True continues the run in the output directory from its checkpoint.pt: "
                f"give --out DIR, or set {key} to a checkpoint file"
            )
        path = Path(out_dir) / "checkpoint.pt"
        if not path.is_file():
            raise CheckpointError(
                f"{key} = True, but there is no checkpoint at {path} (a run saves one every "
                f"k epochs with train.checkpoint_every = k); to start again, pass --overwrite"
            )
        return path
    if isinstance(resume, (str, os.PathLike)) and str(resume):
        path = Path(resume)
        if path.is_dir():
            path = path / "checkpoint.pt"
        if not path.is_file():
            raise CheckpointError(f"{key} = {str(resume)!r}: no checkpoint at {path}")
        return path
    raise ConfigError(
        f"{key} must be True, False or the path of a checkpoint, got {resume!r} "
        f"({type(resume).__name__})"
    )


def restore(path: Path, model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load the model and optimizer states of a checkpoint; a state that does not fit (the
    code of the model changed) is a :class:`CheckpointError` naming the file."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} does not fit this model or optimizer ({first})"
        ) from None


# -- sharded (FSDP2) checkpoints ------------------------------------------------------------------
def sharded_name(checkpoint: Path, epoch: int) -> str:
    """The DCP directory of epoch ``epoch``'s sharded model and optimizer, next to
    ``checkpoint`` (a new one per save: the file is replaced only once its shards are all
    written, so a crash leaves the previous pair intact)."""
    return f"{checkpoint.stem}.epoch{epoch}.dcp"


def save_sharded(
    checkpoint: Path, epoch: int, model: torch.nn.Module, optimizer: Any, ctx: Any
) -> str:
    """Every rank writes its shards of ``model`` and ``optimizer`` (factors included) with
    :mod:`curvlab.distributed_checkpoint`; returns the directory's name (relative)."""
    from curvlab import distributed_checkpoint

    name = sharded_name(checkpoint, epoch)
    distributed_checkpoint.save(checkpoint.parent / name, model, optimizer)
    return name


def remove_older_sharded(checkpoint: Path, keep: str) -> None:
    """Remove the DCP directories of earlier saves (after ``checkpoint`` points at ``keep``)."""
    import shutil

    for path in checkpoint.parent.glob(f"{checkpoint.stem}.epoch*.dcp"):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def restore_sharded(path: Path, model: torch.nn.Module, optimizer: Any) -> None:
    """Load a sharded model and optimizer, resharded to this run's ranks; a directory that is
    missing or does not fit is a :class:`CheckpointError` naming it. DCP reads its metadata
    with ``pickle``: load sharded checkpoints only from sources you trust (docs/security.md)."""
    from curvlab import distributed_checkpoint

    if not path.is_dir():
        raise CheckpointError(f"sharded checkpoint {path} is missing (checkpoint.pt names it)")
    try:
        distributed_checkpoint.load(path, model, optimizer)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"sharded checkpoint {path} does not fit this model or optimizer ({first})"
        ) from None
