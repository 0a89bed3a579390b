"""The ``torch_distributed`` reducer: 2 gloo processes on 127.0.0.1 against one process.

One module fixture starts two worker processes (``_dist_worker.py``, as torchrun would: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port) that run every scenario once in one process
group and save their results; the tests below compare those with single-process references
computed here by the same ``train`` function. The workers are killed after
``WORKER_TIMEOUT_S``; every collective has a 30 s group timeout; each worker destroys its group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import gin
import pytest
import torch
import torch.distributed as dist

import curvlab
from curvlab import registry
from curvlab.plugins.reducers.torch_distributed import TorchDistributedReducer
from tests.plugins.reducers import _dist_worker as worker

ROOT = Path(__file__).resolve().parents[3]
WORLD = 2
WORKER_TIMEOUT_S = 120
TOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise equal lists of tensors."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Results of every scenario on rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(WORLD),
        OMP_NUM_THREADS="1",
    )
    procs, logs = [], []
    for rank in range(WORLD):
        log = open(out / f"rank{rank}.log", "w+")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.plugins.reducers._dist_worker", str(out)],
                cwd=ROOT,
                env=dict(env, RANK=str(rank)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        for p in procs:
            p.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed workers did not finish within {WORKER_TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        text = []
        for log in logs:
            log.seek(0)
            text.append(log.read())
            log.close()
    if any(p.returncode for p in procs):
        pytest.fail("a worker failed:\n" + "\n----\n".join(text))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def scenario(ranks: list[dict], name: str) -> list[dict]:
    for rank, results in enumerate(ranks):
        if "error" in results[name]:
            pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{results[name]['error']}")
    return [results[name] for results in ranks]


# -- (a) two processes on half batches = one process on the full batch -----------------------------
@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_two_ranks_match_one_process(ranks: list[dict], model: str) -> None:
    r0, r1 = (r[model] for r in scenario(ranks, "equivalence"))
    reference = worker.train(model)
    assert max_diff(r0["params"], reference["params"]) < TOL
    assert same(r0["params"], r1["params"])
    assert r0["metrics"] == r1["metrics"] == {"steps": worker.STEPS, "skipped_steps": 0}
    # the run moved the parameters: the comparison is not trivially true
    initial = list(worker.make_model(model).parameters())
    assert max_diff(reference["params"], initial) > 0.1


@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("case", sorted(worker.ESTIMATOR_CASES))
def test_two_ranks_match_one_process_full_and_banded(ranks: list[dict], case: str, model: str):
    results = scenario(ranks, "estimators")
    if "skipped" in results[0]:
        pytest.skip(results[0]["skipped"])
    r0, r1 = (r[case, model] for r in results)
    estimator, _ = worker.ESTIMATOR_CASES[case]
    reference = worker.train(model, estimator=estimator)
    assert max_diff(r0["params"], reference["params"]) < TOL
    assert max_diff(r0["params"], r1["params"]) < 1e-12  # eigh may differ in the last bit
    assert r0["metrics"]["skipped_steps"] == 0


# -- (b) one collective per bucket, not per layer --------------------------------------------------
@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
def test_one_collective_per_bucket(ranks: list[dict]) -> None:
    for result in scenario(ranks, "collectives"):
        # 4 steps, curvature every 2nd: the statistics buckets carry the finite flag
        # (Reducer.reduce_with_flag), other steps send the flag alone
        one = result["one_bucket"]
        assert one["buckets"] == 1
        assert [len(calls) for calls in one["per_step"]] == [1, 1, 1, 1]
        small = result["small_buckets"]
        assert 1 < small["buckets"] < 10  # 10 statistics of 5 layers
        assert [len(c) for c in small["per_step"]] == [small["buckets"], 1] * 2
        # the flag is not needed when gradients are DDP-averaged: 1 collective per update
        assert [len(c) for c in result["local_flag"]["per_step"]] == [1, 0, 1, 0]
        # bucketing does not change a single bit
        for other in ("small_buckets", "local_flag"):
            assert same(one["params"], result[other]["params"])
        # statistics and finite flag in one collective
        combined = result["combined"]
        assert combined["calls"] == ["all_reduce"]
        assert bool(combined["ok"]) is False  # rank 1 passed False
        assert [float(c) for c in combined["counts"]] == [1 + 2, 1 + 3]
        assert torch.equal(combined["totals"][0], torch.full((5,), 3.0, dtype=torch.float64))
        assert torch.equal(combined["totals"][1], torch.full((3, 3), 6.0, dtype=torch.float64))


# -- (c) a NaN on one rank skips the step on every rank --------------------------------------------
@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
@pytest.mark.parametrize("where", ["grad", "input"])
def test_nan_on_one_rank_skips_on_all(ranks: list[dict], where: str) -> None:
    r0, r1 = (r[where] for r in scenario(ranks, "nan"))
    assert r0["metrics"]["skipped_steps"] == r1["metrics"]["skipped_steps"] == 1
    assert same(r0["params"], r1["params"])
    assert all(bool(p.isfinite().all()) for p in r0["params"])
    for res in (r0, r1):
        assert len(res["logged"]) == 1 and "step 3 skipped on all 2 ranks" in res["logged"][0]
    if where == "grad":  # only rank 1 saw it; rank 0 learns it through the collective
        assert "on another rank (rank 0)" in r0["logged"][0]
        assert "on this rank (rank 1)" in r1["logged"][0]


@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
def test_local_flag_without_synchronised_gradients_diverges(ranks: list[dict]) -> None:
    """Negative control: a NaN only in rank 1's *reduced* gradient, finite_flag='local'."""
    r0, r1 = (r["grad_local_flag"] for r in scenario(ranks, "nan"))
    assert (r0["metrics"]["skipped_steps"], r1["metrics"]["skipped_steps"]) == (0, 1)
    assert max_diff(r0["params"], r1["params"]) > 1e-4


# -- (d) gradient accumulation under no_sync() -----------------------------------------------------
@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_gradient_accumulation_no_sync(ranks: list[dict], model: str) -> None:
    """10 rows per step: 5 per rank in micro-batches of 2, 2, 1 (the last one synchronises)."""
    r0, r1 = (r[model] for r in scenario(ranks, "accumulation"))
    reference = worker.train(model, sizes=[10] * worker.STEPS)
    assert max_diff(r0["params"], reference["params"]) < TOL
    assert same(r0["params"], r1["params"])


# -- (e) unequal batches are weighted by sample count ----------------------------------------------
@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
def test_unequal_last_batch_weighted_by_count(ranks: list[dict]) -> None:
    r0, r1 = (r["last"] for r in scenario(ranks, "unequal"))
    reference = worker.train("mlp", sizes=worker.UNEQUAL_SIZES)
    assert max_diff(r0["params"], reference["params"]) < TOL
    assert same(r0["params"], r1["params"])


@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
def test_unequal_split_every_step(ranks: list[dict]) -> None:
    r0, _ = (r["every"] for r in scenario(ranks, "unequal"))
    assert max_diff(r0["params"], worker.train("mlp")["params"]) < TOL


# -- any list of tensors ---------------------------------------------------------------------------
@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
def test_any_structure_mixed_dtypes_packing_async(ranks: list[dict]) -> None:
    r0, r1 = scenario(ranks, "structures")
    expected = [a + b for a, b in zip(r0["inputs"], r1["inputs"], strict=True)]
    expected_counts = [a + b for a, b in zip(r0["counts_in"], r1["counts_in"], strict=True)]
    for res in (r0, r1):
        totals, counts = res["plain"]
        for got, want in zip(totals, expected, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            tol = 1e-2 if want.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert [float(c) for c in counts] == expected_counts
        assert res["plain_collectives"] == 3  # fp64, fp32, bf16 (as fp32): one bucket each
        packed, packed_counts = res["packed"]
        torch.testing.assert_close(packed[1], expected[1], rtol=1e-12, atol=1e-12)
        assert torch.equal(packed[1], packed[1].T)
        assert torch.equal(packed[0], totals[0])
        assert [float(c) for c in packed_counts] == expected_counts[:2]
        assert res["packed_bytes"] < res["unpacked_bytes"]  # 15 instead of 25 entries
        assert same(res["async"][0], totals)
        assert "every rank must capture the same layers" in res["validate_error"]


# -- overlap_backward: the all-reduce launched during the backward pass ----------------------------
@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
@pytest.mark.parametrize("case", list(worker.OVERLAP_RUNS), ids="-".join)
def test_overlap_equals_reduction_in_step(ranks: list[dict], case: tuple[str, str]) -> None:
    """DDP (exact loss scaling), with 3 accumulated micro-batches under no_sync, an unequal
    last batch, full factors, a NaN on one rank: the statistics launched during backward give
    the numbers of the same run reduced in step() (1e-12) and of one process (1e-12)."""
    kwargs, (other, key) = worker.OVERLAP_RUNS[case]
    r0, r1 = (r[case] for r in scenario(ranks, "overlap"))
    off = scenario(ranks, other)[0][key]
    assert max_diff(r0["on"]["params"], off["params"]) < 1e-12
    assert same(r0["on"]["params"], r1["on"]["params"])
    assert r0["on"]["metrics"] == r1["on"]["metrics"] == off["metrics"]
    _, model = case
    per_backward = {"mlp": 5, "cnn": 3}[model]  # captured layers
    in_backward, at_end = r0["launches"]
    # tiny buckets: every layer launched as it completes, in the backward pass (before its end)
    backwards = 3 * worker.STEPS if case[0] == "accumulation" else worker.STEPS
    assert (in_backward, at_end) == (per_backward * backwards, 0)
    if case == ("nan", "mlp"):  # one process has no "NaN in one rank's rows"
        assert r0["on"]["metrics"]["skipped_steps"] == 1
        return
    kwargs = {k: v for k, v in kwargs.items() if k not in ("splits", "micro_batches")}
    reference = worker.train(model, **kwargs)
    assert max_diff(r0["on"]["params"], reference["params"]) < 1e-12
    initial = list(worker.make_model(model).parameters())
    assert max_diff(reference["params"], initial) > 1e-3  # the run moved the parameters


@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
@pytest.mark.parametrize("split_forwards", [False, True])
def test_overlap_reused_layer_unreached_outputs_no_grad_forwards(
    ranks: list[dict], split_forwards: bool
) -> None:
    """A layer used three times per forward (one output without gradient), a head that only
    some losses reach, no_grad and eval forwards, curvature every 2nd step, an unequal last
    batch, 2 micro-batches (their forwards interleaved with or ahead of their backwards)."""
    r0, r1 = (r["reuse", split_forwards] for r in scenario(ranks, "overlap"))
    assert max_diff(r0["on"]["params"], r0["off"]["params"]) < 1e-12
    assert same(r0["on"]["params"], r1["on"]["params"])
    reference = worker.train_reuse(split_forwards=split_forwards)
    assert max_diff(r0["on"]["params"], reference["params"]) < 1e-12
    assert reference["metrics"] == r0["on"]["metrics"] == {"steps": 8, "skipped_steps": 0}
    # 8 backward passes with statistics: the reused layer (and, with both forwards first, the
    # first backward's layers) waits for the end of each backward; the others go at once
    in_backward, at_end = r0["launches"]
    assert (in_backward, at_end) == ((18, 4) if split_forwards else (20, 8))


@pytest.mark.slow  # two worker processes (shared by the module, ≈ 10 s)
def test_overlap_default_bucket_launches_once_per_backward(ranks: list[dict]) -> None:
    r0, r1 = (r["default_bucket"] for r in scenario(ranks, "overlap"))
    assert r0["launches"] == (0, worker.STEPS)  # the whole MLP fits the 4 MiB bucket
    assert max_diff(r0["params"], worker.train("mlp")["params"]) < 1e-12
    assert same(r0["params"], r1["params"])


# -- in-process checks (no worker) -----------------------------------------------------------------
def test_clear_error_without_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        registry.create("reducers", "torch_distributed")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="reducer='none'"):
        curvlab.AdaFisher(model, reducer="torch_distributed")


@pytest.fixture
def single_rank_group():
    """A one-process gloo group on a free port, destroyed afterwards."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_rank_group_trains_like_none(single_rank_group, caplog) -> None:  # noqa: ANN001
    results = {}
    for name in ("none", "torch_distributed"):
        results[name] = worker.train("mlp", reducer=name)["params"]
    assert same(results["none"], results["torch_distributed"])
    reducer = TorchDistributedReducer(group=single_rank_group)
    with caplog.at_level(logging.WARNING):
        assert bool(reducer.all_finite(torch.tensor(False))) is False
    assert "step 0 skipped on all 1 ranks" in caplog.text
    assert reducer.collectives == 0  # nothing to communicate with one rank


def test_arguments_validated_and_gin_bindable(single_rank_group) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="bucket_size_mb"):
        TorchDistributedReducer(bucket_size_mb=0)
    with pytest.raises(ValueError, match="finite_flag"):
        TorchDistributedReducer(finite_flag="sometimes")
    registry.load_builtin_plugins()
    gin.parse_config(
        "reducers.torch_distributed.bucket_size_mb = 4\n"
        "reducers.torch_distributed.finite_flag = 'local'\n"
    )
    # plugins created by name read gin bindings inside registry.gin_bindings()
    with getattr(registry, "gin_bindings", contextlib.nullcontext)():
        reducer = registry.create("reducers", "torch_distributed")
    assert (reducer.bucket_size_mb, reducer.finite_flag) == (4, "local")
    gin.parse_config("reducers.torch_distributed.overlap_backward = True\n")
    with getattr(registry, "gin_bindings", contextlib.nullcontext)():
        reducer = registry.create("reducers", "torch_distributed")
    assert reducer.overlap_backward and reducer.overlap is None  # one rank: nothing to overlap


def test_overlap_on_one_rank_trains_like_none(single_rank_group) -> None:  # noqa: ANN001
    reducer = TorchDistributedReducer(overlap_backward=True)
    got = worker.train("mlp", reducer=reducer, micro_batches=2)["params"]
    assert same(got, worker.train("mlp", reducer="none", micro_batches=2)["params"])
    assert reducer.collectives == 0
