"""MNIST-1D (Greydanus, 2020): 4000 training and 1000 test sequences of length 40, 10 classes.

A procedurally generated benchmark built to separate models and training methods at small scale
(published test accuracies: logistic regression 32%, MLP 68%, CNN 94%, GRU 91%). The data are
generated here, offline, by the PyPI package ``mnist1d`` (install ``curvlab[data]``) with the
published default arguments, exactly as its README shows::

    from mnist1d.data import make_dataset, get_dataset_args
    data = make_dataset(get_dataset_args())

``make_dataset`` uses only NumPy and SciPy (templates, padding, interpolation, noise, shear,
seeded with ``np.random.seed(42)``): no network access. The package's ``get_dataset`` downloads
the frozen pickle by default and is never called here. The output was measured equal to that
frozen file to 9e-16. ``make_dataset`` reseeds NumPy's and Python's global random generators;
their states are restored afterwards.

The arrays are cached as ``mnist1d/<key>.npz`` under ``cache_dir`` (default ``$CURVLAB_CACHE`` or
``~/.cache/curvlab``, as the generated stdlib corpus), the key hashing the generation arguments
and the package version, and are checked against their fingerprint on every load. Inputs are
used as published (the generator already centres the whole set and scales it to unit standard
deviation): no re-standardisation, so the published protocol is reproduced as it was run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import gin
import numpy as np
import torch

from curvlab.experiments.data.embedded import Split
from curvlab.experiments.data.stdlib_corpus import default_cache_dir

#: ``mnist1d.data.get_dataset_args()`` of the published package (its ``url`` left out: never
#: used). Checked against the installed package before generating (tests check it too).
DEFAULT_ARGS: dict[str, Any] = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}
#: inputs are rounded to this many decimals for the fingerprint, so that floating-point
#: differences between NumPy/SciPy builds (≈1e-15) do not change it; the data's own noise is 2e-2
FINGERPRINT_DECIMALS = 5
INSTALL_HINT = "pip install 'curvlab[data]' (or: pip install mnist1d)"
ARRAYS = ("x", "y", "x_test", "y_test")


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the four arrays: labels as int64, inputs as int64 of round(x · 10^5)."""
    digest = hashlib.sha256()
    for name in ARRAYS:
        a = np.asarray(arrays[name])
        if name.startswith("x"):
            a = np.rint(a * 10.0**FINGERPRINT_DECIMALS)
        a = np.ascontiguousarray(a.astype("<i8"))
        digest.update(f"{name}:{a.shape}:".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _package_version() -> str:
    if importlib.util.find_spec("mnist1d") is None:
        raise ModuleNotFoundError(
            f"data.mnist1d needs the 'mnist1d' package to generate the data: {INSTALL_HINT}"
        )
    return importlib.metadata.version("mnist1d")


def generate() -> dict[str, np.ndarray]:
    """The published dataset from ``make_dataset(get_dataset_args())`` (float64 inputs, int64
    labels; keys ``x``, ``y``, ``x_test``, ``y_test``). Global NumPy/Python RNG states are
    restored afterwards."""
    _package_version()
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    published = {k: v for k, v in vars(args).items() if k != "url"}
    if published != DEFAULT_ARGS:
        raise RuntimeError(
            f"mnist1d {importlib.metadata.version('mnist1d')}: get_dataset_args() is {published}, "
            f"not the published defaults curvlab expects ({DEFAULT_ARGS})"
        )
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {name: np.asarray(data[name]) for name in ARRAYS}


def cache_key(version: str) -> str:
    blob = json.dumps({"args": DEFAULT_ARGS, "mnist1d": version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_arrays(cache_dir: str | os.PathLike | None = None, cache: bool = True) -> dict[str, Any]:
    """The four arrays plus ``fingerprint``, from the cache or generated (and then cached)."""
    version = _package_version()
    path = Path(cache_dir or default_cache_dir()) / "mnist1d" / f"{cache_key(version)}.npz"
    if cache and path.is_file():
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in ARRAYS}
            recorded = str(stored["fingerprint"])
        if fingerprint(arrays) == recorded:
            return {**arrays, "fingerprint": recorded}
        # a damaged cache file: rebuilt below
    arrays = generate()
    digest = fingerprint(arrays)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        # written beside, then renamed: concurrent runs never read a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, fingerprint=np.array(digest), **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return {**arrays, "fingerprint": digest}


@gin.configurable(module="data")
def mnist1d(
    validation: bool = False,
    validation_fraction: float = 0.2,
    split_seed: int = 0,
    cache_dir: str | None = None,
) -> Split:
    """MNIST-1D as published: x (N, 40) float32, y (N,) int64; 4000 train / 1000 test.

    ``validation=True`` returns, in place of the test set, a validation set holding out
    ``validation_fraction`` of the 4000 training sequences (stratified by class, seeded by
    ``split_seed``: 3200 / 800 at the default), for tuning without touching the test set.
    Otherwise the published split, in the published order (the reference protocol takes its
    batches in that order). ``cache_dir``: see the module docstring.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"data.mnist1d.validation_fraction must lie in (0, 1), got {validation_fraction}"
        )
    a = load_arrays(cache_dir)
    x, y, x_test, y_test = a["x"], a["y"], a["x_test"], a["y_test"]
    if validation:
        from sklearn.model_selection import train_test_split

        x, x_test, y, y_test = train_test_split(
            x, y, test_size=validation_fraction, random_state=split_seed, stratify=y
        )
    return Split(
        torch.as_tensor(x, dtype=torch.float32),
        torch.as_tensor(y, dtype=torch.long),
        torch.as_tensor(x_test, dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.long),
        10,
    )
