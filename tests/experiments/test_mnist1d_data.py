"""data.mnist1d: the published MNIST-1D arrays, generated offline by the `mnist1d` package."""

import importlib
import importlib.util
import random
import socket

import numpy as np
import pytest
import torch

from curvlab.experiments.data import mnist1d
from curvlab.experiments.data.mnist1d import (
    DEFAULT_ARGS,
    fingerprint,
    generate,
    load_arrays,
)

#: measured on these machines (numpy/scipy/mnist1d 0.0.2.post1); inputs rounded to 1e-5
FINGERPRINT = "c39f0d4e142195ae78f59d9151012e2dc8c32a9d118f8c8b589c9566f25c96f3"
TRAIN_COUNTS = [398, 396, 411, 394, 394, 402, 401, 404, 402, 398]
TEST_COUNTS = [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]
#: the module (``curvlab.experiments.data.mnist1d`` as an attribute is the loader function)
MODULE = importlib.import_module("curvlab.experiments.data.mnist1d")


@pytest.fixture(scope="module")
def split(mnist1d_cache):
    return mnist1d(cache_dir=mnist1d_cache)


def test_shapes_dtypes_and_class_balance(split):
    assert split.x_train.shape == (4000, 40) and split.x_test.shape == (1000, 40)
    assert split.y_train.shape == (4000,) and split.y_test.shape == (1000,)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.long
    assert split.num_classes == 10
    assert torch.bincount(split.y_train, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(split.y_test, minlength=10).tolist() == TEST_COUNTS


def test_fingerprint_and_the_generators_standardisation(mnist1d_cache):
    arrays = load_arrays(mnist1d_cache)
    assert arrays["fingerprint"] == FINGERPRINT == fingerprint(arrays)
    assert arrays["x"].dtype == np.float64
    # make_dataset centres all 5000 sequences together and scales them to unit std: used as is
    everything = np.concatenate([arrays["x"], arrays["x_test"]])
    assert abs(everything.mean()) < 1e-12 and abs(everything.std() - 1.0) < 1e-12
    assert arrays["y"][:10].tolist() == [2, 6, 4, 5, 6, 6, 6, 0, 3, 1]
    assert arrays["y_test"][:10].tolist() == [2, 6, 3, 9, 4, 3, 1, 9, 5, 2]
    np.testing.assert_allclose(arrays["x"][0, 0], -0.3320056673693902, rtol=0, atol=1e-12)
    np.testing.assert_allclose(arrays["x_test"][-1, -1], 1.193151836835276, rtol=0, atol=1e-12)


def test_tensors_equal_the_arrays_in_the_published_order(split, mnist1d_cache):
    arrays = load_arrays(mnist1d_cache)
    assert torch.equal(split.x_train, torch.as_tensor(arrays["x"], dtype=torch.float32))
    assert torch.equal(split.y_test, torch.as_tensor(arrays["y_test"]))


def test_fingerprint_sees_a_changed_value(mnist1d_cache):
    arrays = {k: v.copy() for k, v in load_arrays(mnist1d_cache).items() if k != "fingerprint"}
    arrays["x_test"][3, 7] += 1e-4
    assert fingerprint(arrays) != FINGERPRINT
    arrays["x_test"][3, 7] -= 1e-4
    arrays["y"][0] = (arrays["y"][0] + 1) % 10
    assert fingerprint(arrays) != FINGERPRINT


def test_validation_split_holds_out_part_of_the_training_set(split, mnist1d_cache):
    val = mnist1d(validation=True, cache_dir=mnist1d_cache)
    assert val.x_train.shape == (3200, 40) and val.x_test.shape == (800, 40)
    # stratified: every class keeps its share (to within one sequence)
    share = torch.bincount(val.y_test, minlength=10).double() / 800
    assert torch.allclose(share, torch.tensor(TRAIN_COUNTS).double() / 4000, atol=1 / 800)
    # both parts come from the training set, disjoint, and the test set is untouched
    rows = {tuple(r) for r in split.x_train.tolist()}
    val_rows = [tuple(r) for r in val.x_test.tolist()]
    train_rows = [tuple(r) for r in val.x_train.tolist()]
    assert all(r in rows for r in val_rows + train_rows)
    assert len(set(val_rows) | set(train_rows)) == 4000
    assert not {tuple(r) for r in split.x_test.tolist()} & set(val_rows)
    again = mnist1d(validation=True, cache_dir=mnist1d_cache)
    assert torch.equal(again.x_test, val.x_test)
    other = mnist1d(validation=True, split_seed=1, cache_dir=mnist1d_cache)
    assert not torch.equal(other.y_test, val.y_test)
    with pytest.raises(ValueError, match="validation_fraction"):
        mnist1d(validation=True, validation_fraction=1.0, cache_dir=mnist1d_cache)


def test_a_damaged_cache_file_is_rebuilt(tmp_path, mnist1d_cache, monkeypatch):
    good = load_arrays(mnist1d_cache)
    calls = []

    def fake_generate():
        calls.append(1)
        return {k: good[k] for k in ("x", "y", "x_test", "y_test")}

    monkeypatch.setattr(MODULE, "generate", fake_generate)
    first = load_arrays(tmp_path)  # empty cache: generated and written
    (path,) = (tmp_path / "mnist1d").glob("*.npz")
    assert load_arrays(tmp_path)["fingerprint"] == first["fingerprint"] and len(calls) == 1
    stored = dict(np.load(path))
    stored["x"][0, 0] += 1.0
    np.savez(path, **stored)
    assert load_arrays(tmp_path)["fingerprint"] == FINGERPRINT and len(calls) == 2


def test_missing_package_is_one_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mnist1d" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"needs the 'mnist1d' package.*pip install"):
        mnist1d(cache_dir=str(tmp_path))


def test_published_default_arguments():
    from mnist1d.data import get_dataset_args

    published = get_dataset_args(as_dict=True)
    assert {k: v for k, v in published.items() if k != "url"} == DEFAULT_ARGS


@pytest.mark.slow
def test_generation_is_offline_and_leaves_global_rngs_alone(monkeypatch):
    """make_dataset(get_dataset_args()) with every socket refused gives the published data."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access while generating MNIST-1D")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    arrays = generate()
    assert fingerprint(arrays) == FINGERPRINT
    assert np.random.rand() == expected_np and random.random() == expected_py
