"""CIFAR-10 / CIFAR-100 from a local directory in the standard python-pickle layout.

Nothing is downloaded (SPEC §5). Expected layout (as distributed by the dataset's authors)::

    ROOT/cifar-10-batches-py/data_batch_1 … data_batch_5, test_batch
    ROOT/cifar-100-python/train, test

``ROOT`` defaults to ``$CURVLAB_DATA`` or ``./data``; the dataset folder itself may also be given
as ``root``. Each pickle holds a dict with ``b"data"`` (N × 3072 uint8, channel-major 32×32) and
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` / ``b"coarse_labels"`` (CIFAR-100).
Images are returned as float32 (N, 3, 32, 32), standardised per channel with the training mean
and standard deviation.

The batches are pickles, and a pickle can run code. They are read by :class:`CifarUnpickler`,
which resolves only the globals a CIFAR batch needs (numpy's array reconstruction) and refuses
any other; a corrupt or foreign file is a one-line error naming it (docs/security.md).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import gin
import numpy as np
import torch

from curvlab.experiments.data.embedded import Split

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR100_DIR = "cifar-100-python"
CIFAR100_TRAIN = ("train",)
CIFAR100_TEST = ("test",)


def default_root() -> Path:
    """``$CURVLAB_DATA`` or ``./data``."""
    return Path(os.environ.get("CURVLAB_DATA", "data"))


def locate(root: str | os.PathLike | None, folder: str, files: tuple[str, ...], name: str) -> Path:
    """The directory holding ``files``: ``root/folder`` or ``root`` itself.

    Raises FileNotFoundError naming the expected directory and every missing file.
    """
    root = Path(root) if root is not None else default_root()
    candidates = [root / folder, root] if root.name != folder else [root]
    for candidate in candidates:
        if all((candidate / f).is_file() for f in files):
            return candidate
    expected = candidates[0]
    missing = [f for f in files if not (expected / f).is_file()]
    raise FileNotFoundError(
        f"{name} not found: expected the files {', '.join(files)} in the directory "
        f"{expected.resolve()} (missing: {', '.join(missing)}). Nothing is downloaded: place the "
        f"dataset there (python version, e.g. the extracted {folder}/ folder) or pass root=... "
        f"(gin: data.{name.lower().replace('-', '')}.root = '...') or set $CURVLAB_DATA."
    )


#: the only globals a CIFAR python batch refers to (numpy < 2 and numpy >= 2 module paths)
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, bytes, numbers and numpy arrays, nothing else."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}, which a CIFAR batch never needs (only numpy arrays "
                f"are allowed)"
            )
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    """One CIFAR batch file, read with :class:`CifarUnpickler`; ``ValueError`` naming the file
    when it is not one."""
    try:
        with open(path, "rb") as fh:
            batch = CifarUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} is not a CIFAR python batch: {err}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(
            f"{path} is not a CIFAR python batch (truncated or corrupt: "
            f"{type(err).__name__}: {str(err)[:120]})"
        ) from None
    if not isinstance(batch, dict):
        kind = type(batch).__name__
        raise ValueError(f"{path} is not a CIFAR python batch (a {kind}, not a dict)")
    return batch


def _load_batches(
    directory: Path, files: tuple[str, ...], label_key: bytes
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        path = directory / f
        batch = read_batch(path)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(
                f"{path} is not a CIFAR python batch (keys {sorted(batch)}, "
                f"expected b'data' and {label_key!r})"
            )
        try:
            image = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            label = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: malformed CIFAR batch ({err})") from None
        if len(image) != len(label):
            raise ValueError(f"{path}: {len(image)} images but {len(label)} labels")
        images.append(image)
        labels.append(label)
    return np.concatenate(images), np.concatenate(labels)


def _to_split(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    n_train: int | None,
    n_test: int | None,
) -> Split:
    x_tr = torch.from_numpy(train[0][:n_train]).float().div_(255.0)
    x_te = torch.from_numpy(test[0][:n_test]).float().div_(255.0)
    mean = x_tr.mean(dim=(0, 2, 3), keepdim=True)
    std = x_tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    return Split(
        (x_tr - mean) / std,
        torch.from_numpy(train[1][:n_train]),
        (x_te - mean) / std,
        torch.from_numpy(test[1][:n_test]),
        num_classes,
    )


@gin.configurable(module="data")
def cifar10(
    root: str | os.PathLike | None = None, n_train: int | None = None, n_test: int | None = None
) -> Split:
    """CIFAR-10 (50 000 / 10 000 32×32 colour images, 10 classes); ``n_*`` keep the first n."""
    directory = locate(root, CIFAR10_DIR, CIFAR10_TRAIN + CIFAR10_TEST, "CIFAR-10")
    train = _load_batches(directory, CIFAR10_TRAIN, b"labels")
    test = _load_batches(directory, CIFAR10_TEST, b"labels")
    return _to_split(train, test, 10, n_train, n_test)


@gin.configurable(module="data")
def cifar100(
    root: str | os.PathLike | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    labels: str = "fine",
) -> Split:
    """CIFAR-100 (50 000 / 10 000 images); ``labels`` "fine" (100 classes) or "coarse" (20)."""
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    directory = locate(root, CIFAR100_DIR, CIFAR100_TRAIN + CIFAR100_TEST, "CIFAR-100")
    key = f"{labels}_labels".encode()
    train = _load_batches(directory, CIFAR100_TRAIN, key)
    test = _load_batches(directory, CIFAR100_TEST, key)
    return _to_split(train, test, 100 if labels == "fine" else 20, n_train, n_test)
