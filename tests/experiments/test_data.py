"""Data of curvlab.experiments.data: synthetic CIFAR, CIFAR/WikiText readers, augmentation."""

import pickle

import numpy as np
import pytest
import torch

from curvlab.experiments import data
from curvlab.experiments.data.cifar import CIFAR10_TEST, CIFAR10_TRAIN


def test_synthetic_cifar_is_deterministic_and_cifar_shaped():
    a, b = data.synthetic_cifar(seed=3), data.synthetic_cifar(seed=3)
    assert a.x_train.shape == (512, 3, 32, 32) and a.x_test.shape == (256, 3, 32, 32)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.long
    torch.testing.assert_close(a.x_train, b.x_train)
    assert torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, data.synthetic_cifar(seed=4).x_train)
    assert a.num_classes == 10 and set(a.y_train.tolist()) == set(range(10))
    small = data.synthetic_cifar(n_train=20, n_test=10, num_classes=4)
    assert small.x_train.shape[0] == 20 and int(small.y_train.max()) == 3


def test_synthetic_cifar_is_learnable():
    """The class patterns carry signal: nearest class mean beats chance by far."""
    s = data.synthetic_cifar()
    means = torch.stack([s.x_train[s.y_train == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(s.x_test.flatten(1), means).argmin(1)
    assert (pred == s.y_test).float().mean() > 0.5


# -- CIFAR ----------------------------------------------------------------------------------------
def write_batch(path, n, label_keys, rng):
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    for key, classes in label_keys.items():
        batch[key] = rng.integers(0, classes, n).tolist()
    path.write_bytes(pickle.dumps(batch))
    return batch


def test_cifar10_reads_the_python_pickle_layout(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f: write_batch(folder / f, 4, {b"labels": 10}, rng) for f in CIFAR10_TRAIN}
    test = write_batch(folder / CIFAR10_TEST[0], 3, {b"labels": 10}, rng)
    split = data.cifar10(root=tmp_path)
    assert split.x_train.shape == (20, 3, 32, 32) and split.x_test.shape == (3, 3, 32, 32)
    assert split.num_classes == 10
    expected = [y for f in CIFAR10_TRAIN for y in batches[f][b"labels"]]
    assert split.y_train.tolist() == expected and split.y_test.tolist() == test[b"labels"]
    # channel-major rows, standardised per channel with the training statistics
    raw = torch.tensor(batches["data_batch_1"][b"data"][0], dtype=torch.float32)
    pixel = raw.reshape(3, 32, 32)[:, 5, 7] / 255
    all_train = torch.tensor(
        np.concatenate([batches[f][b"data"] for f in CIFAR10_TRAIN]), dtype=torch.float32
    ).reshape(-1, 3, 32, 32) / 255
    mean, std = all_train.mean((0, 2, 3)), all_train.std((0, 2, 3))
    torch.testing.assert_close(split.x_train[0, :, 5, 7], (pixel - mean) / std)
    torch.testing.assert_close(split.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    # the dataset folder itself may be given, and subsets taken
    assert data.cifar10(root=folder, n_train=5, n_test=2).x_train.shape[0] == 5


def test_cifar100_fine_and_coarse_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    keys = {b"fine_labels": 100, b"coarse_labels": 20}
    train = write_batch(folder / "train", 6, keys, rng)
    write_batch(folder / "test", 2, keys, rng)
    fine = data.cifar100(root=tmp_path)
    coarse = data.cifar100(root=tmp_path, labels="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.y_train.tolist() == train[b"fine_labels"]
    assert coarse.y_train.tolist() == train[b"coarse_labels"]
    with pytest.raises(ValueError, match="fine"):
        data.cifar100(root=tmp_path, labels="medium")


def test_cifar_missing_files_name_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.cifar10(root=tmp_path)
    msg = str(err.value)
    assert str((tmp_path / "cifar-10-batches-py").resolve()) in msg
    for name in (*CIFAR10_TRAIN, "test_batch"):
        assert name in msg
    assert "Nothing is downloaded" in msg

    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 .*missing: test\)"):
        data.cifar100(root=tmp_path)


def test_cifar_root_defaults_to_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CURVLAB_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        data.cifar10()


# -- augmentation ---------------------------------------------------------------------------------
def images(n=8, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_augment_is_seeded_and_keeps_shape():
    x = images()
    a = data.CifarAugment(seed=1)(x)
    assert a.shape == x.shape
    torch.testing.assert_close(a, data.CifarAugment(seed=1)(x))
    assert not torch.equal(a, data.CifarAugment(seed=2)(x))


def test_augment_flip_only():
    x = images(16)
    out = data.CifarAugment(padding=0, cutout=0, seed=0)(x)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_augment_crop_is_a_window_of_the_padded_image():
    x = images(6)
    out = data.CifarAugment(padding=4, flip=False, cutout=0, seed=0)(x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    shifts = []
    for o, p in zip(out, padded, strict=True):
        hits = [
            (dy, dx) for dy in range(9) for dx in range(9)
            if torch.equal(o, p[:, dy : dy + 32, dx : dx + 32])
        ]
        assert hits, "output is not a crop of the zero-padded image"
        shifts.append(hits[0])
    assert len(set(shifts)) > 1


def test_augment_cutout_zeroes_one_clipped_square():
    x = torch.ones(32, 3, 32, 32)
    out = data.CifarAugment(padding=0, flip=False, cutout=16, seed=0)(x)
    for o in out:
        hole = o[0] == 0
        assert torch.equal(hole, (o == 0).all(0))  # same hole in every channel
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16
        assert int(hole.sum()) == len(rows) * len(cols)  # a rectangle (square clipped at borders)
    assert (out == 0).any()


# -- WikiText-2 -----------------------------------------------------------------------------------
TEXT = {"train": " = Title = \n the cat sat \n", "valid": " the dog sat \n", "test": " a cat \n"}


@pytest.mark.parametrize("suffix", ["tokens", "raw"])
def test_wikitext2_reads_raw_files(tmp_path, suffix):
    for split, text in TEXT.items():
        (tmp_path / f"wiki.{split}.{suffix}").write_text(text, encoding="utf-8")
    corpus = data.wikitext2(root=tmp_path)
    assert corpus.vocab_size == 256
    assert bytes(corpus.train.to(torch.uint8).tolist()).decode() == TEXT["train"]
    assert corpus.valid.dtype == torch.long and len(corpus.test) == len(TEXT["test"])

    words = data.wikitext2(root=tmp_path, tokenizer="words")
    vocab = words.vocab
    assert vocab[0] == "<unk>" and "<eos>" in vocab and "dog" not in vocab
    decoded = [vocab[i] for i in words.valid.tolist()]
    assert decoded == ["the", "<unk>", "sat", "<eos>"]
    assert words.vocab_size == len(vocab)


def test_wikitext2_subfolder_and_missing_files(tmp_path):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    for split, text in TEXT.items():
        (folder / f"wiki.{split}.tokens").write_text(text)
    assert len(data.wikitext2(root=tmp_path).train) == len(TEXT["train"])
    (folder / "wiki.test.tokens").unlink()
    with pytest.raises(FileNotFoundError) as err:
        data.wikitext2(root=tmp_path)
    msg = str(err.value)
    assert "wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens" in msg
    assert "wiki.test.raw" in msg and str(tmp_path.resolve()) in msg


def test_digits_validation_split_comes_from_the_training_portion():
    full, val = data.digits(), data.digits(validation=True)
    assert len(val.x_train) + len(val.x_test) == len(full.x_train)  # the test set is left out
    assert len(val.x_test) == 288
