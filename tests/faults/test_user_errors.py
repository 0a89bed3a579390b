"""Bad input to ``curvlab run`` / ``ablate`` / ``check-curvature``: one line ``error: ...``
naming the key, value or file (and for unknown names the valid ones with the closest match),
a non-zero exit status and no traceback; ``--debug`` shows the traceback.

The checks run ``cli.main`` in this process (every error here comes before any training); one
case goes through a real ``python -m curvlab`` subprocess to see what a user's terminal shows.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from curvlab import cli
from curvlab.experiments.data.cifar import CIFAR10_DIR, CIFAR10_TEST, CIFAR10_TRAIN
from tests.faults.helpers import DIGITS, assert_one_line_error, curvlab

RUN = ["run", DIGITS, "--quiet"]


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def cifar_folder(root, corrupt: bytes | None = None):
    """A CIFAR-10 folder of tiny valid batches; data_batch_1 replaced by ``corrupt``."""
    folder = root / CIFAR10_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10_TRAIN + CIFAR10_TEST:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1] * 4}
        (folder / name).write_bytes(pickle.dumps(batch))
    if corrupt is not None:
        (folder / "data_batch_1").write_bytes(corrupt)
    return folder


class CreatesAFile:
    """Unpickling this calls open(path, "w"): a payload that leaves visible evidence."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


RUN_CASES = {
    "misspelled key": (
        ["--bind", "optimizer.lrr = 0.01"],
        ["optimizer.lrr", "did you mean 'lr'", "lr, beta"],
    ),
    "misspelled configurable": (
        ["--bind", "optimiser.lr = 0.01"],
        ["'optimiser'", "did you mean 'optimizer'"],
    ),
    "misspelled reference": (
        ["--bind", "train.model = @models.digit_cnn"],
        ["models.digit_cnn", "did you mean 'models.digits_cnn'", "models.mlp"],
    ),
    "malformed binding": (["--bind", "optimizer.lr"], ["--bind 'optimizer.lr'", "KEY = VALUE"]),
    "unbalanced binding": (["--bind", "optimizer.lr = (0.1"], ["--bind 'optimizer.lr = (0.1'"]),
    "fractional epochs": (["--bind", "train.epochs = 1.5"], ["train.epochs", "1.5"]),
    "zero epochs": (["--bind", "train.epochs = 0"], ["train.epochs", "got 0"]),
    "zero batch size": (["--bind", "train.batch_size = 0"], ["train.batch_size", "got 0"]),
    "negative batch size": (["--bind", "train.batch_size = -8"], ["train.batch_size", "-8"]),
    "zero threads": (["--bind", "train.num_threads = 0"], ["train.num_threads"]),
    "number as string": (
        ["--bind", "optimizer.lr = '0.01'"],
        ["optimizer", "lr", "the string '0.01'"],
    ),
    "epochs as string": (["--bind", "train.epochs = '3'"], ["train.epochs", "the string '3'"]),
    "unknown plugin name": (
        ["--bind", "optimizer.estimator = 'diagonl'"],
        ["'diagonl'", "did you mean 'diagonal'", "banded, diagonal, full"],
    ),
    "bad time budget": (["--bind", "train.time_budget_s = -1.0"], ["train.time_budget_s"]),
    "bad distributed timeout": (
        ["--bind", "train.distributed_timeout_s = 0"],
        ["train.distributed_timeout_s"],
    ),
    "unknown device": (["--bind", "train.device = 'gpu0'"], ["train.device", "'gpu0'"]),
    "checkpoints without --out": (
        ["--bind", "train.checkpoint_every = 1"],
        ["train.checkpoint_every", "--out"],
    ),
    "resume without --out": (["--bind", "train.resume = True"], ["train.resume", "--out"]),
    "resume from a missing file": (
        ["--bind", "train.resume = 'no/such/checkpoint.pt'"],
        ["train.resume", "no/such/checkpoint.pt"],
    ),
    "missing plugin file": (["--plugins", "no_such_plugin.py"], ["no_such_plugin.py"]),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_bad_input_is_one_line(case, capsys):
    extra, fragments = RUN_CASES[case]
    code, err = run_cli(capsys, RUN + extra)
    assert code == 2
    assert_one_line_error(code, err, *fragments)


def test_missing_config_names_it_and_the_available_ones(capsys):
    code, err = run_cli(capsys, ["run", "configs/digits_adafishr.gin"])
    assert_one_line_error(code, err, "configs/digits_adafishr.gin", "configs/digits_adafisher.gin")


def test_optimizer_only_config_says_what_a_run_needs(capsys):
    code, err = run_cli(capsys, ["run", "configs/kfac.gin", "--quiet"])
    assert_one_line_error(
        code, err, "configs/kfac.gin", "train.model", "train.data", "include", "digits_adafisher"
    )


def test_unwritable_out_names_the_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = run_cli(capsys, RUN + ["--out", blocker / "run"])
    assert_one_line_error(code, err, "cannot create the output directory", str(blocker / "run"))


def test_misspelled_key_in_a_config_file_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "mine.gin"
    config.write_text('include "digits_adafisher.gin"\n\ntrain.epoch = 3\n')
    code, err = run_cli(capsys, ["run", config, "--quiet"])
    assert_one_line_error(code, err, f"{config} line 3", "train.epoch", "did you mean 'epochs'")


def test_corrupt_cifar_file_is_named(tmp_path, capsys):
    folder = cifar_folder(tmp_path, corrupt=pickle.dumps({b"data": 1})[:-7])
    code, err = run_cli(capsys, RUN + [
        "--bind", "train.data = @data.cifar10", "--bind", f"data.cifar10.root = '{tmp_path}'",
    ])  # fmt: skip
    assert_one_line_error(code, err, str(folder / "data_batch_1"), "not a CIFAR python batch")


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    evidence = tmp_path / "pwned"
    folder = cifar_folder(tmp_path, corrupt=pickle.dumps({b"data": CreatesAFile(evidence)}))
    code, err = run_cli(capsys, RUN + [
        "--bind", "train.data = @data.cifar10", "--bind", f"data.cifar10.root = '{tmp_path}'",
    ])  # fmt: skip
    assert_one_line_error(code, err, str(folder / "data_batch_1"), "refers to io.open")
    assert not evidence.exists()
    # the payload is real: plain pickle runs it
    pickle.loads((folder / "data_batch_1").read_bytes())
    assert evidence.exists()


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="train.epochs"):
        cli.main(RUN + ["--bind", "train.epochs = 1.5", "--debug"])


def test_the_console_shows_one_line_and_no_traceback(tmp_path):
    """What a terminal shows, through a real interpreter: a misspelled key."""
    done = curvlab("run", DIGITS, "--bind", "optimizer.lrr=0.01", "--out", str(tmp_path / "r"))
    assert done.returncode == 2
    assert_one_line_error(done.returncode, done.stderr, "optimizer.lrr", "did you mean 'lr'")
    assert not (tmp_path / "r").exists()  # nothing was created for a run that never started


# -- ablate ---------------------------------------------------------------------------------------
def grid_file(tmp_path, variants: str, extra: str = "") -> str:
    path = tmp_path / "grid.gin"
    path.write_text(
        f'ablate.base = "configs/digits_adafisher.gin"\nablate.seeds = [0]\n{extra}'
        f"ablate.variants = {variants}\n"
    )
    return str(path)


ABLATE_CASES = {
    "parent directory": ('{"..": []}', ["'..'", "must match"]),
    "hidden folder": ('{".x": []}', ["'.x'"]),
    "path separator": ('{"a/b": []}', ["'a/b'"]),
    "report file name": ('{"results.md": []}', ["'results.md'"]),
    "duplicate name": ('{"a": [], "b": [], "a": ["train.seed = 1"]}', ["'a'", "more than once"]),
    "names differing in case": ('{"adam": [], "Adam": []}', ["'adam'", "'Adam'", "case"]),
}


@pytest.mark.parametrize("case", list(ABLATE_CASES))
def test_ablate_bad_grid_is_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    variants, fragments = ABLATE_CASES[case]
    grid = grid_file(tmp_path, variants)
    # "--out base/out": a variant ".." would run in base/seed_0, still inside tmp_path
    code, err = run_cli(capsys, ["ablate", grid, "--out", tmp_path / "base" / "out", "--quiet"])
    assert_one_line_error(code, err, *fragments)
    assert not list(tmp_path.rglob("seed_*"))  # no run started, inside --out or not


def test_ablate_command_line_errors(tmp_path, capsys):
    grid = grid_file(tmp_path, '{"a": []}')
    code, err = run_cli(capsys, ["ablate", grid, "--jobs", "0"])
    assert_one_line_error(code, err, "--jobs", "got 0")
    code, err = run_cli(capsys, ["ablate", tmp_path / "no_grid.gin"])
    assert_one_line_error(code, err, "no_grid.gin")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = run_cli(capsys, ["ablate", grid, "--out", blocker / "out", "--quiet"])
    assert_one_line_error(code, err, str(blocker / "out"))
    code, err = run_cli(capsys, ["ablate", grid, "--bind", "ablate.seedz = [1]"])
    assert_one_line_error(code, err, "ablate.seedz", "did you mean 'seeds'")


# -- check-curvature ------------------------------------------------------------------------------
CHECK_CASES = {
    "missing config": (["configs/nope.gin"], ["configs/nope.gin"]),
    "optimizer-only config": (["configs/kfac.gin"], ["train.model", "train.data"]),
    "misspelled key": (
        ["configs/digits_mlp_backpack.gin", "--bind", "optimizer.gama = 0.5"],
        ["optimizer.gama", "did you mean 'gamma'"],
    ),
    "zero batch": (["configs/digits_mlp_backpack.gin", "--batch-size", "0"], ["--batch-size"]),
    "negative tolerance": (["configs/digits_mlp_backpack.gin", "--tol", "-1"], ["--tol"]),
    "missing plugin": (["configs/digits_mlp_backpack.gin", "--plugin", "mine.py"], ["mine.py"]),
}


@pytest.mark.parametrize("case", list(CHECK_CASES))
def test_check_curvature_bad_input_is_one_line(case, capsys):
    argv, fragments = CHECK_CASES[case]
    code, err = run_cli(capsys, ["check-curvature", *argv])
    assert_one_line_error(code, err, *fragments)


def test_numbers_given_as_strings_are_refused_by_the_api():
    import curvlab
    from curvlab.experiments.train import torch_optimizer

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="the string '0.01'"):
        curvlab.AdaFisher(model, lr="0.01")
    with pytest.raises(ValueError, match="the string '1e-3'"):
        curvlab.AdaFisher(model, weight_decay="1e-3")
    with pytest.raises(ValueError, match="baselines.torch_optimizer.lr"):
        torch_optimizer(model, lr="0.1")
