"""Checkpoints resume bit-for-bit in a *new process* (issue 8, item 1).

This process trains k steps, saves model + optimizer + LR scheduler with ``torch.save``, and a
child python process (``python -m tests.test_resume_subprocess CHECKPOINT_DIR``) builds fresh
objects, loads them and takes the remaining m steps. After k + m steps its parameters, buffers,
optimizer state (momentum, factors, K-FAC/banded eigenbases, counters) and learning rate must
equal an uninterrupted run in this process bitwise. Every optimizer runs in the one child, so
the test pays for one interpreter start.

The in-process round trip (with and without ``torch.save``) is tests/test_optimizer_api.py::
test_state_dict_round_trip_resumes_bitwise; this file adds the process boundary, the LR
scheduler, and the K-FAC, banded and Adam compositions built from configs/*.gin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import curvlab

REPO = Path(__file__).resolve().parent.parent
K_STEPS = 5  # K-FAC's inverse_interval is 10: the resumed run reuses cached eigenbases first
M_STEPS = 8  # ... and refreshes them at step 10, after the resume
TOTAL = K_STEPS + M_STEPS


class ConvNet(nn.Sequential):
    """Conv2d, BatchNorm2d (buffers), Linear, LayerNorm: layers of every optimizer here."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 3, 3),
            nn.ReLU(),
            nn.BatchNorm2d(3),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 6),
            nn.LayerNorm(6),
            nn.Tanh(),
            nn.Linear(6, 3),
        )


def config(name: str):
    return lambda m: curvlab.build_optimizer(m, REPO / "configs" / name)


#: name → optimizer factory; the same table is used by the child process
OPTIMIZERS = {
    "adafisher_paper": lambda m: curvlab.AdaFisher(m, lr=1e-2, weight_decay=1e-4),
    # curvature every 2 steps: the resume point (step 5) is in the middle of an interval
    "adafisher_official": lambda m: curvlab.AdaFisher(
        m, lr=1e-3, variant="official", curvature_interval=2, weight_decay=1e-4
    ),
    "adafisherw": lambda m: curvlab.AdaFisherW(m, lr=1e-2, weight_decay=1e-2),
    "kfac": config("kfac.gin"),
    "banded": config("banded_adafisher.gin"),
    "adam": config("adam.gin"),
}


def make_scheduler(opt):
    # chainable (recursive) form: the resumed lr depends on the saved scheduler state
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL, eta_min=1e-4)


def batches():
    g = torch.Generator().manual_seed(123)
    return [
        (torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(TOTAL)
    ]


def initial_model(seed: int) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet()


def train(model, opt, sched, data) -> None:
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def snapshot(model, opt, sched) -> dict:
    """Everything the run's future depends on, as plain tensors."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "state": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        "curvature": {
            n: {k: v.clone() for k, v in s.items()} for n, s in opt.curvature_state.items()
        },
        "metrics": opt.metrics(),
        "lr": [g["lr"] for g in opt.param_groups],
        "last_lr": sched.get_last_lr(),
    }


def resume_in_this_process(directory: Path) -> None:
    """The child: fresh objects (another init seed), load, continue, save the result."""
    torch.set_num_threads(1)
    data = batches()
    for name, make in OPTIMIZERS.items():
        checkpoint = torch.load(directory / f"{name}.pt")
        model = initial_model(seed=999)  # overwritten by the checkpoint
        opt = make(model)
        sched = make_scheduler(opt)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        assert opt.metrics()["steps"] == K_STEPS, (name, opt.metrics())
        train(model, opt, sched, data[K_STEPS:])
        torch.save(snapshot(model, opt, sched), directory / f"{name}.resumed.pt")


def assert_bitwise(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_bitwise(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    data = batches()
    references = {}
    for name, make in OPTIMIZERS.items():
        # uninterrupted run
        model = initial_model(seed=0)
        opt = make(model)
        sched = make_scheduler(opt)
        train(model, opt, sched, data)
        references[name] = snapshot(model, opt, sched)

        # interrupted run: k steps, then a checkpoint on disk
        model = initial_model(seed=0)
        opt = make(model)
        sched = make_scheduler(opt)
        train(model, opt, sched, data[:K_STEPS])
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
            },
            tmp_path / f"{name}.pt",
        )
    # the caches that make K-FAC/banded resume subtle are really in the checkpoint
    saved = torch.load(tmp_path / "kfac.pt")["optimizer"]["curvature"]["layers"]
    assert {"H_inv", "S_inv"} <= set(saved["0"])  # K-FAC's inverses of the damped factors
    saved = torch.load(tmp_path / "banded.pt")["optimizer"]["curvature"]["layers"]
    assert {"QH_blocks", "QS_blocks", "LH", "LS"} <= set(saved["0"])  # banded's block eigenbases

    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_resume_subprocess", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    for name, reference in references.items():
        resumed = torch.load(tmp_path / f"{name}.resumed.pt")
        assert resumed["metrics"] == {"steps": TOTAL, "skipped_steps": 0}, name
        assert_bitwise(resumed, reference, name)


if __name__ == "__main__":
    resume_in_this_process(Path(sys.argv[1]))
