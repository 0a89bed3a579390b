"""Real datasets that scikit-learn ships: digits (8×8 images, 10 classes) and iris."""

from __future__ import annotations

from typing import NamedTuple

import gin
import torch
from torch import Tensor


class Split(NamedTuple):
    """Tensors of a train/test split (inputs are standardised with train statistics)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def _split(  # noqa: ANN001
    x, y, test_fraction: float, split_seed: int, num_classes: int, validation: bool = False
) -> Split:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    if validation:  # tune on a held-out part of the training portion; the test set is unused
        x_tr, x_te, y_tr, y_te = train_test_split(
            x_tr, y_tr, test_size=test_fraction, random_state=split_seed, stratify=y_tr
        )
    x_tr = torch.as_tensor(x_tr, dtype=torch.float32)
    x_te = torch.as_tensor(x_te, dtype=torch.float32)
    mean, std = x_tr.mean(0, keepdim=True), x_tr.std(0, keepdim=True)
    std = torch.where(std > 1e-3, std, 1.0)  # constant features (digits' blank border pixels)
    return Split(
        (x_tr - mean) / std,
        torch.as_tensor(y_tr, dtype=torch.long),
        (x_te - mean) / std,
        torch.as_tensor(y_te, dtype=torch.long),
        num_classes,
    )


@gin.configurable(module="data")
def digits(
    test_fraction: float = 0.2, split_seed: int = 0, image: bool = True, validation: bool = False
) -> Split:
    """scikit-learn's handwritten digits (1797 real 8×8 images); ``image`` gives (N, 1, 8, 8).

    ``validation=True`` returns, in place of the test set, a validation set holding out
    ``test_fraction`` of the training portion (same seed), for tuning hyperparameters without
    touching the test set.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    split = _split(data.data, data.target, test_fraction, split_seed, 10, validation)
    if image:
        split = split._replace(
            x_train=split.x_train.reshape(-1, 1, 8, 8), x_test=split.x_test.reshape(-1, 1, 8, 8)
        )
    return split


@gin.configurable(module="data")
def iris(test_fraction: float = 0.3, split_seed: int = 0, validation: bool = False) -> Split:
    """scikit-learn's iris (150 flowers, 4 features, 3 classes); ``validation`` as for digits."""
    from sklearn.datasets import load_iris

    data = load_iris()
    return _split(data.data, data.target, test_fraction, split_seed, 3, validation)
