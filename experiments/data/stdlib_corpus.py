"""A byte-level language-modelling corpus built from the running Python's standard library.

Real text with headroom that is always present and needs no download: the ``.py`` source files
under ``sysconfig.get_paths()["stdlib"]`` (about 12 MB on CPython 3.11).

Build rule (deterministic; documented so that the corpus can be rebuilt anywhere):

* **Files**: every regular ``*.py`` file below the root, found by ``os.walk`` without following
  symbolic links (symlinked files are skipped too), sorted by their POSIX path relative to the
  root. Excluded: any path component in :data:`EXCLUDED_DIRS` (``site-packages``,
  ``dist-packages``, ``__pycache__``, test directories ``test``/``tests``/``idle_test``), files
  named ``test_*.py``, the build-specific ``_sysconfigdata_*.py`` and the top-level ``config-*``
  directory (``python-config.py``): both embed the build machine's paths and flags.
  ``include`` (fnmatch patterns on the relative path) and ``max_files`` (the first N of the
  sorted list) select a subset, e.g. for tests.
* **Split by file**: files are ranked by ``sha256(relative path)``; the first
  ``max(1, round(n · valid_fraction))`` go to validation, the next
  ``max(1, round(n · test_fraction))`` to test, the rest to training (rule ``"sha256-rank"``).
  Within a split, files keep the sorted order.
* **Stream**: each split is the concatenation of its files' bytes, each followed by one ``0x00``
  byte (end of file; NUL never occurs in the sources). Tokens are bytes: vocabulary 256.
* **Fingerprint**: ``sha256`` over the sorted file list and contents (for each file: its relative
  path, NUL, its length in decimal, NUL, its bytes). It identifies the corpus independently of
  where the standard library lives; ``split_rule`` and the per-split sizes say how it was cut.

The streams are built once and cached under ``cache_dir`` (default ``$CURVLAB_CACHE`` or
``~/.cache/curvlab``) in ``stdlib_corpus/<key>/`` (``train.bin``, ``valid.bin``, ``test.bin``,
``meta.json``); the key hashes the root, the Python version, the options and every selected
file's size and modification time, so an edited standard library is rebuilt, not served stale.

:func:`wikitext2_corpus` gives WikiText-2 (read by :mod:`curvlab.experiments.data.wikitext`
from a local directory) the same interface: an :class:`LMCorpus` with ``info``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import gin
import numpy as np
import torch
from torch import Tensor

from curvlab.experiments.data.wikitext import wikitext2

SPLITS = ("train", "valid", "test")
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
SPLIT_RULE = "sha256-rank"
SEPARATOR = b"\x00"
CACHE_FORMAT = 1


class LMCorpus(NamedTuple):
    """Token streams of a language-modelling corpus (the fields of ``TextSplit`` plus ``info``).

    ``train``/``valid``/``test`` are 1-D tensors of token ids (uint8 for byte corpora, to keep
    tens of MB small; int64 otherwise). ``info`` holds the corpus name, fingerprint, sizes and
    ``bytes_per_token`` per split (1.0 for bytes), recorded in every run's metrics.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab_size: int
    vocab: tuple[str, ...] | None = None
    info: dict[str, Any] | None = None


def default_cache_dir() -> Path:
    """``$CURVLAB_CACHE`` or ``~/.cache/curvlab``."""
    env = os.environ.get("CURVLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "curvlab"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel_parts: tuple[str, ...]) -> bool:
    *dirs, name = rel_parts
    if any(d in EXCLUDED_DIRS for d in dirs):
        return True
    if dirs and dirs[0].startswith("config-"):
        return True
    return name.startswith("test_") or name.startswith("_sysconfigdata")


def list_files(
    root: str | os.PathLike | None = None,
    include: Sequence[str] | None = None,
    max_files: int | None = None,
) -> list[str]:
    """The sorted relative POSIX paths of the corpus files (see the module docstring)."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library root {root} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).parts
        dirnames[:] = [
            d for d in dirnames
            if d not in EXCLUDED_DIRS and not (not rel_dir and d.startswith("config-"))
        ]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            parts = (*rel_dir, name)
            if not _excluded(parts):
                found.append("/".join(parts))
    found.sort()
    if include is not None:
        if isinstance(include, str):
            include = [include]
        found = [f for f in found if any(fnmatch.fnmatchcase(f, pat) for pat in include)]
    if max_files is not None:
        found = found[:max_files]
    return found


def split_files(
    files: Sequence[str], valid_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, list[str]]:
    """The ``sha256-rank`` split by file (each split keeps the sorted order)."""
    if not (0 < valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError("need 0 < valid_fraction, test_fraction and their sum < 1")
    n = len(files)
    n_valid = max(1, round(n * valid_fraction))
    n_test = max(1, round(n * test_fraction))
    if n_valid + n_test >= n:
        raise ValueError(
            f"{n} file(s) cannot be split into non-empty train/valid/test sets by file "
            f"(need at least {n_valid + n_test + 1}); select more files"
        )
    ranked = sorted(files, key=lambda f: (hashlib.sha256(f.encode()).hexdigest(), f))
    valid, test = set(ranked[:n_valid]), set(ranked[n_valid : n_valid + n_test])
    return {
        "train": [f for f in files if f not in valid and f not in test],
        "valid": [f for f in files if f in valid],
        "test": [f for f in files if f in test],
    }


def _cache_key(root: Path, files: list[str], options: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(
        dict(format=CACHE_FORMAT, root=str(root.resolve()), python=platform.python_version(),
             options=options),
        sort_keys=True,
    ).encode())
    for rel in files:
        st = (root / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def build(
    root: Path, files: list[str], valid_fraction: float, test_fraction: float
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Read the files and assemble the three byte streams and their metadata (no cache)."""
    parts = split_files(files, valid_fraction, test_fraction)
    fingerprint = hashlib.sha256()
    contents: dict[str, bytes] = {}
    for rel in files:
        data = (root / rel).read_bytes()
        contents[rel] = data
        fingerprint.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    streams = {
        s: b"".join(contents[f] + SEPARATOR for f in parts[s]) for s in SPLITS
    }
    info = dict(
        corpus="stdlib",
        fingerprint=fingerprint.hexdigest(),
        python=platform.python_version(),
        n_files=len(files),
        total_bytes=sum(len(c) for c in contents.values()),
        split_rule=SPLIT_RULE,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        files={s: len(parts[s]) for s in SPLITS},
        tokens={s: len(streams[s]) for s in SPLITS},
        split_sha256={s: hashlib.sha256(streams[s]).hexdigest() for s in SPLITS},
        bytes_per_token={s: 1.0 for s in SPLITS},
        tokenizer="bytes",
    )
    return streams, dict(info, split_files=parts)


def _load_cached(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arrays = {s: np.fromfile(folder / f"{s}.bin", dtype=np.uint8) for s in SPLITS}
    except (OSError, ValueError):
        return None
    if any(len(arrays[s]) != meta["tokens"][s] for s in SPLITS):
        return None
    return arrays, meta


@gin.configurable(module="data")
def stdlib_corpus(
    root: str | os.PathLike | None = None,
    include: Sequence[str] | None = None,
    max_files: int | None = None,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> LMCorpus:
    """The standard-library byte corpus (module docstring: files, split, fingerprint, cache).

    ``root``: the library to read (default the running Python's ``stdlib``). ``include`` /
    ``max_files``: a subset (tests). ``cache_dir``: default ``$CURVLAB_CACHE`` or
    ``~/.cache/curvlab``; ``use_cache=False`` builds in memory and writes nothing.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = list_files(root, include, max_files)
    if len(files) < 3:
        raise ValueError(
            f"the selection holds {len(files)} file(s) under {root}; a train/valid/test split "
            f"by file needs at least 3"
        )
    options = dict(include=list(include) if include is not None else None, max_files=max_files,
                   valid_fraction=valid_fraction, test_fraction=test_fraction)
    cached = None
    folder = None
    if use_cache:
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder = base / "stdlib_corpus" / _cache_key(root, files, options)
        cached = _load_cached(folder)
    if cached is None:
        streams, meta = build(root, files, valid_fraction, test_fraction)
        arrays = {s: np.frombuffer(streams[s], dtype=np.uint8) for s in SPLITS}
        if folder is not None:
            _write_cache(folder, streams, meta)
        meta["cached"] = False
    else:
        arrays, meta = cached
        meta["cached"] = True
    if folder is not None:
        meta["cache_path"] = str(folder)
    tensors = {s: torch.from_numpy(arrays[s].copy()) for s in SPLITS}
    return LMCorpus(tensors["train"], tensors["valid"], tensors["test"], 256, None, meta)


def _write_cache(folder: Path, streams: dict[str, bytes], meta: dict[str, Any]) -> None:
    """Write into a temporary sibling, then rename: concurrent builders never see half a cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        for s in SPLITS:
            (tmp / f"{s}.bin").write_bytes(streams[s])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race: its cache is identical
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@gin.configurable(module="data")
def wikitext2_corpus(root: str | os.PathLike | None = None, tokenizer: str = "bytes") -> LMCorpus:
    """WikiText-2 (local raw files, see :func:`curvlab.experiments.data.wikitext2`) as an
    :class:`LMCorpus`: the fingerprint hashes the three token streams and the vocabulary;
    ``bytes_per_token`` (UTF-8 bytes of the split / its tokens) turns nats per token into bits
    per byte for the ``"words"`` tokenizer too."""
    split = wikitext2(root=root, tokenizer=tokenizer)
    streams = {s: getattr(split, s) for s in SPLITS}
    if tokenizer == "bytes":
        bytes_per_token = {s: 1.0 for s in SPLITS}
        streams = {s: t.to(torch.uint8) for s, t in streams.items()}
    else:
        from curvlab.experiments.data.wikitext import find_wikitext2

        paths = find_wikitext2(root)
        bytes_per_token = {
            s: paths[s].stat().st_size / max(1, len(streams[s])) for s in SPLITS
        }
    h = hashlib.sha256()
    for s in SPLITS:
        h.update(s.encode() + b"\0" + streams[s].numpy().tobytes())
    if split.vocab is not None:
        h.update("\n".join(split.vocab).encode())
    info = dict(
        corpus="wikitext2",
        fingerprint=h.hexdigest(),
        tokenizer=tokenizer,
        tokens={s: len(streams[s]) for s in SPLITS},
        bytes_per_token=bytes_per_token,
        vocab_size=split.vocab_size,
    )
    return LMCorpus(streams["train"], streams["valid"], streams["test"], split.vocab_size,
                    split.vocab, info)


def corpus_info(corpus: Any) -> dict[str, Any]:
    """``corpus.info`` without the per-file lists, or a fingerprint of a plain ``TextSplit``."""
    info = getattr(corpus, "info", None)
    if info is not None:
        return {k: v for k, v in info.items() if k != "split_files"}
    h = hashlib.sha256()
    for s in SPLITS:
        h.update(s.encode() + b"\0" + getattr(corpus, s).to(torch.int64).numpy().tobytes())
    return dict(
        corpus="unnamed",
        fingerprint=h.hexdigest(),
        tokens={s: len(getattr(corpus, s)) for s in SPLITS},
        bytes_per_token={s: 1.0 for s in SPLITS} if corpus.vocab_size == 256 else None,
    )


def unigram_cross_entropy(train: Tensor, target: Tensor, vocab_size: int = 256) -> float:
    """Cross-entropy (nats per token) of ``target`` under the add-one-smoothed unigram
    distribution of ``train``: the baseline a language model must beat."""
    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    freq = torch.bincount(target.long(), minlength=vocab_size).double()
    return float(-(freq * logp).sum() / freq.sum())


__all__ = [
    "LMCorpus",
    "corpus_info",
    "default_cache_dir",
    "list_files",
    "split_files",
    "stdlib_corpus",
    "unigram_cross_entropy",
    "wikitext2_corpus",
]
