"""FSDP2 (``fully_shard``): 2 gloo processes on 127.0.0.1 against one process.

One module fixture starts two worker processes (``_fsdp_worker.py``, as torchrun would) that run
every scenario once in one process group; the tests compare their results with single-process
references computed here by the same ``train`` function. Workers are killed after
``WORKER_TIMEOUT_S``; every collective has a 30 s group timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curvlab.preconditioner import Term
from curvlab.sharding import shard_rows_of_term
from tests import _fsdp_worker as worker

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
WORKER_TIMEOUT_S = 150
TOL = 1e-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def run_workers(
    out: Path,
    module: str,
    world: int = WORLD,
    timeout: float = WORKER_TIMEOUT_S,
    args: tuple[str, ...] = (),
) -> list[dict]:
    """Start ``world`` ranks of ``python -m module OUT *args``; their saved results."""
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    procs, logs = [], []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w+")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, str(out), *args],
                cwd=ROOT,
                env=dict(env, RANK=str(rank)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"FSDP workers did not finish within {timeout} s")
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
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    # the one-process checkpoints that the ranks resume (1 → 2)
    one = {
        case: worker.train(
            case,
            steps=worker.CHECKPOINT_STEPS,
            save=(worker.CHECKPOINT_STEP, str(out / "one_process" / case)),
        )
        for case in worker.CHECKPOINT_CASES
    }
    results = run_workers(out, "tests._fsdp_worker", args=(str(out / "one_process"),))
    results[0]["one_process_checkpoint"] = one
    results[0]["checkpoint_dir"] = out / "checkpoint"
    return results


def scenario(ranks: list[dict], name: str) -> list[dict]:
    for rank, results in enumerate(ranks):
        if "error" in results[name]:
            pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{results[name]['error']}")
    return [results[name] for results in ranks]


# -- the rows of a shard: pure functions, no processes ---------------------------------------------
@pytest.mark.parametrize(
    "left_shape, right_shape, rows",
    [
        ((1, 7, 1), (1, 1, 6), 7),  # Linear: S (out) × H (in), with the adapter's group dim
        ((7,), (7,), 7),  # LayerNorm weight: H ⊙ S
        ((3, 2, 1), (3, 1, 5), 6),  # grouped conv: 3 groups of 2 output channels
        ((2, 1, 3), (1, 4, 1), 4),  # a layout that interleaves rows (the materialising path)
    ],
)
def test_shard_rows_equal_rows_of_the_product(left_shape, right_shape, rows):
    g = torch.Generator().manual_seed(0)
    left = torch.rand(left_shape, generator=g, dtype=torch.float64)
    right = torch.rand(right_shape, generator=g, dtype=torch.float64)
    shape = Term.of(left, right).shape
    whole = (left * right).reshape(rows, -1)
    for start in range(rows + 1):
        for stop in range(start, rows + 1):
            got = torch.empty(stop - start, whole.shape[1], dtype=torch.float64)
            for region, l, r in shard_rows_of_term(left, right, shape, rows, start, stop):
                piece = got[region]
                piece.view(Term.of(l, r).shape).copy_(l if r is None else l * r)
            assert torch.equal(got, whole[start:stop]), (start, stop)


# -- 2 ranks = 1 process ------------------------------------------------------------------------
@pytest.mark.slow  # two worker processes shared by the module (≈ 15 s)
@pytest.mark.parametrize("case", sorted(worker.CASES))
def test_two_ranks_match_one_process(ranks: list[dict], case: str) -> None:
    r0, r1 = (r[case] for r in scenario(ranks, "equivalence"))
    reference = worker.train(case)
    assert max_diff(r0["params"], reference["params"]) < TOL
    assert max_diff(r1["params"], reference["params"]) < TOL
    assert r0["metrics"] == r1["metrics"] == {"steps": worker.STEPS, "skipped_steps": 0}
    # odd output dimensions: the ranks hold unequal rows
    assert r0["local_rows"] != r1["local_rows"]
    assert [a + b for a, b in zip(r0["local_rows"], r1["local_rows"])] == [
        p.shape[0] for p in reference["params"]
    ]
    # per-parameter state lives as DTensors (reshardable by torch.distributed.checkpoint)
    assert "DTensor" in r0["state_types"]
    # the reused buffers are allocated once, not at every step
    assert r0["workspace"] == [r0["workspace"][0]] * worker.STEPS
    # the run moved the parameters: the comparison is not trivially true
    initial = list(worker.make_model(worker.CASES[case][1]).parameters())
    assert max_diff(reference["params"], initial) > 0.04


@pytest.mark.slow
def test_mixed_precision_keeps_factors_in_the_master_dtype(ranks: list[dict]) -> None:
    """param_dtype=float32 over float64 master weights: the forward/backward run in fp32, the
    factors and the update in float64; the result stays within fp32 rounding of the fp64 run.
    bf16 over fp32: factors in fp32."""
    r0, r1 = (r["fp32_over_fp64"] for r in scenario(ranks, "mixed_precision"))
    reference = worker.train("paper_mlp")
    assert r0["factor_dtypes"] == ["torch.float64"]
    assert all(p.dtype == torch.float64 for p in r0["params"])
    assert max_diff(r0["params"], r1["params"]) == 0
    diff = max_diff(r0["params"], reference["params"])
    assert 0 < diff < 1e-4  # fp32 compute: not bitwise the fp64 run, but close
    b0, b1 = (r["bf16_over_fp32"] for r in scenario(ranks, "mixed_precision"))
    assert b0["factor_dtypes"] == ["torch.float32"]
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in b0["params"])
    assert max_diff(b0["params"], b1["params"]) == 0
    # bf16 compute tracks the fp64 trajectory: far closer to it than to where it started
    moved = max_diff(list(worker.make_model("mlp").parameters()), reference["params"])
    assert max_diff([p.double() for p in b0["params"]], reference["params"]) < 0.25 * moved


@pytest.mark.slow
def test_non_finite_step_skipped_on_every_rank(ranks: list[dict]) -> None:
    """A NaN in rank 1's input at step 2: both ranks skip that step (the flag is all-reduced),
    as one process skips it on the whole batch."""
    r0, r1 = scenario(ranks, "nan")
    reference = worker.train("paper_mlp", poison=(2, 0))
    assert reference["metrics"]["skipped_steps"] == 1
    assert r0["metrics"] == r1["metrics"] == reference["metrics"]
    assert max_diff(r0["params"], reference["params"]) < TOL


@pytest.mark.slow
def test_sharded_parameters_require_the_distributed_reducer(ranks: list[dict]) -> None:
    for result in scenario(ranks, "no_reducer"):
        assert "reducer='torch_distributed'" in result["message"]


@pytest.mark.slow
def test_sharded_solve_equals_the_gathered_solve(ranks: list[dict]) -> None:
    """K-FAC's inverse solve on row shards (each rank multiplies its rows by H'⁻¹, the product
    is all-gathered, then S'⁻¹'s rows; the default) and on gathered gradients (every rank
    solves the whole layer) both equal one process; the sharded path is taken on every rank,
    at every step, for each of the MLP's 3 Linear layers (all sharded: two in their own FSDP
    unit, the last in the root's)."""
    reference = worker.train("kfac")
    for run in scenario(ranks, "sharded_solve"):
        assert run["gathered"]["row_solves"] == 0
        assert run["sharded"]["row_solves"] == 3 * worker.STEPS
        for how in ("sharded", "gathered"):
            assert max_diff(run[how]["params"], reference["params"]) < TOL, how


@pytest.mark.slow
@pytest.mark.parametrize("case", worker.SPLIT_CASES)
def test_split_refresh_equals_every_rank_refreshing(ranks: list[dict], case: str) -> None:
    """KAISA: every refresh of a layer runs on one rank only (the ranks' layer sets are disjoint
    and cover every layer), and the parameters are bitwise those of the unsplit 2-rank run."""
    split = [r[case] for r in scenario(ranks, "split")]
    unsplit = [r[case] for r in scenario(ranks, "equivalence")]
    assert max_diff(split[0]["params"], unsplit[0]["params"]) == 0
    assert max_diff(split[1]["params"], unsplit[1]["params"]) == 0
    everything = unsplit[0]["refreshed"]  # every rank refreshes every layer without the split
    assert everything and unsplit[1]["refreshed"] == everything
    assert len(split[0]["refreshed"]) + len(split[1]["refreshed"]) >= len(everything)
    mine = [set(sum(r["refreshed"], [])) for r in split]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == set(sum(everything, []))


# -- statistics all-reduced during the backward pass (overlap_backward) --------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(worker.OVERLAP_CASES))
def test_overlap_backward_matches_one_process(ranks: list[dict], case: str) -> None:
    """``overlap_backward=True`` (one bucket per layer) under FSDP2, 2 accumulated backward
    passes per step where the estimator allows it: one process's parameters to 1e-10, every
    layer's statistics launched inside the backward pass."""
    r0, r1 = (r[case] for r in scenario(ranks, "overlap"))
    reference = worker.train(case)
    assert max_diff(r0["params"], reference["params"]) < TOL
    assert max_diff(r1["params"], reference["params"]) < TOL
    assert r0["metrics"] == r1["metrics"] == {"steps": worker.STEPS, "skipped_steps": 0}
    cls, model_name, kwargs = worker.CASES[case]
    layers = {"mlp": 4, "linear_mlp": 3, "cnn": 3}[model_name]  # captured per backward
    curvature_steps = len(range(0, worker.STEPS, kwargs.get("curvature_interval", 1)))
    backwards = curvature_steps * worker.OVERLAP_CASES[case]
    assert r0["launches"] == r1["launches"] == (layers * backwards, 0)
    unsplit = scenario(ranks, "equivalence")[0][case]  # today's path, one backward per step
    if worker.OVERLAP_CASES[case] == 1:
        assert max_diff(r0["params"], unsplit["params"]) < 1e-12


# -- 4 ranks --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp4")
    return run_workers(out, "tests._fsdp_worker", world=4, args=("", "four_ranks"))


@pytest.mark.slow  # four worker processes (≈ 15 s quiet, 35 s on a loaded 2-core machine)
@pytest.mark.parametrize("case", [*worker.FOUR_RANK_CASES, "paper_mlp_overlap"])
def test_four_ranks_match_one_process(four_ranks: list[dict], case: str) -> None:
    """AdaFisher and K-FAC on 4 ranks: output dimensions 7, 5 and 3 give the ranks 2/2/2/1,
    2/2/1/0 and 1/1/1/0 rows (a rank without rows), LayerNorm and the last Linear stay in the
    root's group; 5 steps equal one process to 1e-10 (AdaFisher also with overlap_backward)."""
    results = [r[case] for r in scenario(four_ranks, "four_ranks")]
    reference = worker.train(case.removesuffix("_overlap"))
    for result in results:
        assert max_diff(result["params"], reference["params"]) < TOL
        assert result["metrics"] == {"steps": worker.STEPS, "skipped_steps": 0}
    rows = [r["local_rows"] for r in results]
    assert [sum(column) for column in zip(*rows)] == [p.shape[0] for p in reference["params"]]
    assert 0 in rows[3] and len({tuple(r) for r in rows}) > 1
    if case.endswith("_overlap"):
        assert results[0]["launches"] == (4 * worker.STEPS, 0)


# -- sharded checkpoints (torch.distributed.checkpoint) ------------------------------------------
def _same_factors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("case", worker.CHECKPOINT_CASES)
def test_checkpoint_saved_on_two_ranks_resumes_on_one(ranks: list[dict], case: str) -> None:
    """2 → 1: the factors (and K-FAC's inverses) come back exactly, and 3 more steps in one
    process end within 1e-12 of the uninterrupted 2-rank run (and of one process throughout)."""
    saved = [r[case]["saved"] for r in scenario(ranks, "checkpoint")]
    resumed = worker.train(
        case, steps=worker.CHECKPOINT_STEPS, resume=str(ranks[0]["checkpoint_dir"] / case)
    )
    _same_factors(resumed["factors"], saved[0]["factors"])
    _same_factors(saved[0]["factors"], saved[1]["factors"])
    if case == "kfac":  # the solver's state travels with the factors
        assert any(key.endswith(("H_inv", "S_inv")) for key in resumed["factors"]), sorted(
            resumed["factors"]
        )
    assert resumed["metrics"] == {"steps": worker.CHECKPOINT_STEPS, "skipped_steps": 0}
    assert max_diff(resumed["params"], saved[0]["params"]) < 1e-12
    uninterrupted = worker.train(case, steps=worker.CHECKPOINT_STEPS)
    assert max_diff(resumed["params"], uninterrupted["params"]) < 1e-12
    # the last 3 steps moved the parameters: the comparison is not trivially true
    at_checkpoint = worker.train(case, steps=worker.CHECKPOINT_STEP)
    assert max_diff(at_checkpoint["params"], uninterrupted["params"]) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("case", worker.CHECKPOINT_CASES)
def test_checkpoint_saved_in_one_process_resumes_on_two_ranks(ranks: list[dict], case: str):
    """1 → 2: each rank loads its rows of the state; the run ends within 1e-12 of one process."""
    one = ranks[0]["one_process_checkpoint"][case]
    resumed = [r[case]["resumed"] for r in scenario(ranks, "checkpoint")]
    for result in resumed:
        _same_factors(result["factors"], one["factors"])
        assert result["metrics"] == {"steps": worker.CHECKPOINT_STEPS, "skipped_steps": 0}
        assert max_diff(result["params"], one["params"]) < 1e-12


@pytest.mark.slow
def test_one_process_state_dict_loads_into_the_sharded_optimizer(ranks: list[dict]) -> None:
    """``load_state_dict`` of a whole (one-process) state: each rank keeps its rows as DTensors,
    and the run continues within 1e-10 of one process trained throughout."""
    r0, r1 = scenario(ranks, "plain_state")
    assert "DTensor" in r0["state_types"]
    uninterrupted = worker.train("paper_mlp", steps=6)
    assert max_diff(r0["params"], uninterrupted["params"]) < TOL
    assert max_diff(r1["params"], uninterrupted["params"]) < TOL


# -- every built-in adapter's shard rows, in one process ----------------------------------------
def _layer(name: str) -> tuple[torch.nn.Module, object]:
    """A float64 layer and its forward on a small random input (under float64 defaults)."""
    torch.manual_seed(0)
    nn = torch.nn
    layers = {
        "linear": (nn.Linear(4, 5), lambda m: m(torch.randn(3, 4))),
        "conv1d_grouped": (nn.Conv1d(2, 6, 3, groups=2), lambda m: m(torch.randn(2, 2, 8))),
        "conv2d": (nn.Conv2d(2, 5, 3), lambda m: m(torch.randn(2, 2, 6, 6))),
        "conv_transpose_grouped": (
            nn.ConvTranspose2d(4, 6, 3, groups=2),
            lambda m: m(torch.randn(2, 4, 5, 5)),
        ),
        "batchnorm": (nn.BatchNorm2d(3), lambda m: m(torch.randn(2, 3, 4, 4))),
        "embedding": (nn.Embedding(7, 3), lambda m: m(torch.tensor([[1, 2, 3, 1]]))),
        "attention": (  # q, k, v rows of one packed parameter (regions)
            nn.MultiheadAttention(4, 2),
            lambda m: m(*(3 * [torch.randn(3, 2, 4)]))[0],
        ),
    }
    module, forward = layers[name]
    return module.double(), forward


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        "conv1d_grouped",
        "conv2d",
        "conv_transpose_grouped",
        "batchnorm",
        "embedding",
        "attention",
    ],
)
@pytest.mark.parametrize("world", [2, 3])
def test_shard_preconditioner_equals_rows_of_the_whole(name: str, world: int) -> None:
    """For every parameter split into ``world`` row blocks as FSDP2 does (``torch.chunk``):
    the preconditioned update of a block equals the block of the whole parameter's update,
    for every built-in adapter layout (Kronecker rows, groups, packed regions)."""
    import warnings

    import curvlab
    from curvlab.sharding import RowShard

    module, forward = _layer(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvlab.AdaFisher(module, lr=0.1, allow_no_supported_layer=True)
    torch.set_default_dtype(torch.float64)
    try:
        for _ in range(2):
            opt.zero_grad()
            forward(module).square().sum().backward()
            opt.step()
    finally:
        torch.set_default_dtype(torch.float32)
    params = list(module.parameters())
    updates = [torch.randn_like(p) for p in params]
    whole = opt._make_preconditioner().solve(params, updates)
    fallback = 1 + 1e-3  # F of a parameter without curvature: the layers have their own
    assert all(not torch.allclose(w, v / fallback) for v, w in zip(updates, whole, strict=True))
    for p, v, w in zip(params, updates, whole, strict=True):
        start = 0
        for block in torch.chunk(p.detach(), world):
            stop = start + block.shape[0]
            shard = RowShard(block, start, stop, p.shape, world)
            pre = opt._make_preconditioner({id(p): shard})
            (got,) = pre.solve([block], [v[start:stop]])
            assert torch.equal(got, w[start:stop]), (p.shape, start, stop)
            start = stop
