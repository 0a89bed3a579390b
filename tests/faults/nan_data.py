"""Plugin file for the fault tests (``--plugins tests/faults/nan_data.py``): data with NaN."""

import gin
import torch

from curvlab.experiments.data import digits


@gin.configurable(module="faults")
def digits_with_nan(samples=(5,), test=False):
    """scikit-learn digits with one NaN pixel in each training sample of ``samples`` (in the
    test set too with ``test=True``)."""
    split = digits()
    x_train = split.x_train.clone()
    for i in samples:
        x_train[i].view(-1)[3] = float("nan")
    split = split._replace(x_train=x_train)
    if test:
        x_test = split.x_test.clone()
        x_test[0].view(-1)[3] = float("nan")
        split = split._replace(x_test=x_test)
    return split


@gin.configurable(module="faults")
def all_nan_digits():
    """Every training image is NaN: every step is skipped."""
    split = digits()
    return split._replace(x_train=torch.full_like(split.x_train, float("nan")))
