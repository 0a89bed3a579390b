"""The hook points of reducing during backward, in one process (no process group).

A reducer that takes the statistics of every other layer as soon as the layer completes
(``LayerRecord.pending`` reaches 0, ``LayerRecord.on_statistics``) and hands them back through
``take_reduced()`` must train exactly like ``reducer="none"``: the optimizer adds what was
taken during backward to what the other layers still hold at ``step()``. The distributed
reducer's ``overlap_backward`` is tested on 2 ranks in ``test_torch_distributed.py``.
"""

from __future__ import annotations

import pickle
import threading

import torch
from torch import Tensor
from torch.nn import functional as F

import curvlab
from curvlab.interfaces.reducer import Reducer
from curvlab.layers import LayerRecord
from tests.plugins.reducers import _dist_worker as worker


class TakingReducer(Reducer):
    """One process: takes the statistics of the even-numbered layers as they complete."""

    def __init__(self) -> None:
        self.layers: list[LayerRecord] = []
        self.sums: dict[str, tuple[Tensor, ...]] = {}
        self.taken: list[str] = []  # layer names, in the order they completed
        self._lock = threading.Lock()  # not picklable: the listener must stay out of pickles

    def reduce(self, totals: list[Tensor], counts: list[int]) -> tuple[list[Tensor], list[int]]:
        return totals, counts

    def attach(self, layers: list[LayerRecord]) -> None:
        self.layers = list(layers)
        for record in self.layers[::2]:
            record.on_statistics = self._on_statistics

    def detach(self) -> None:
        for record in self.layers:
            record.on_statistics = None
        self.layers = []

    def _on_statistics(self, record: LayerRecord) -> None:
        if record.pending > 0:
            return
        with self._lock:
            inputs, outputs = record.take()
            stat = (
                inputs.total,
                outputs.total,
                torch.tensor(float(inputs.count)),
                torch.tensor(float(outputs.count)),
            )
            previous = self.sums.get(record.name)
            self.sums[record.name] = (
                stat if previous is None else tuple(a + b for a, b in zip(previous, stat))
            )
            self.taken.append(record.name)

    def take_reduced(self) -> dict[str, tuple[Tensor, ...]]:
        out = {r.name: self.sums[r.name] for r in self.layers if r.name in self.sums}
        self.sums = {}
        return out

    def discard_reduced(self) -> None:
        self.sums = {}


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_taken_during_backward_trains_like_none() -> None:
    """MLP, 3 accumulated micro-batches: half the layers taken during backward, half at step."""
    reducer = TakingReducer()
    got = worker.train("mlp", reducer=reducer, micro_batches=3, sizes=[10] * worker.STEPS)
    want = worker.train("mlp", reducer="none", micro_batches=3, sizes=[10] * worker.STEPS)
    assert max_diff(got["params"], want["params"]) < 1e-12
    assert got["metrics"] == want["metrics"]
    # layers 0, 2, 4 of the 5 (Linear, LayerNorm, Linear, LayerNorm, Linear), last one first
    assert reducer.taken[:3] == ["6", "3", "0"]
    assert len(reducer.taken) == 3 * 3 * worker.STEPS


def test_reused_layer_unreached_output_no_grad_forwards() -> None:
    """A layer used three times (one output without gradient) completes only with the end of
    its last pending output, which never comes: it is left to ``step()``; the others go."""
    reducer = TakingReducer()
    for split_forwards in (False, True):
        got = worker.train_reuse(reducer=reducer, split_forwards=split_forwards)
        want = worker.train_reuse(split_forwards=split_forwards)
        assert max_diff(got["params"], want["params"]) < 1e-12
    assert "shared" not in reducer.taken  # layers: inp, shared, aux, head; taken: inp, aux
    assert {"inp", "aux"} == set(reducer.taken)


def test_zero_grad_discards_what_was_taken_and_pickling_drops_the_listener() -> None:
    def run(reducer: object) -> list[Tensor]:
        model = worker.make_model("mlp")
        opt = curvlab.AdaFisher(model, lr=1e-2, reducer=reducer)
        x, y = worker.make_batches("mlp", [8])[0]
        for _ in range(2):
            F.cross_entropy(model(x[:4] * 3), y[:4]).backward()  # discarded with its gradients
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        pickle.dumps(model)  # the hooks' records travel without the reducer's listener
        return [p.detach().clone() for p in model.parameters()]

    reducer = TakingReducer()
    assert max_diff(run(reducer), run("none")) < 1e-12
    assert reducer.taken  # something was taken (and the discarded pass's part dropped)


def test_grad_scaler_divided_out_of_what_was_taken() -> None:
    """A constant GradScaler scale 2¹²: the statistics taken during backward carry s², which
    ``step()`` divides out as for the others; powers of two make the factors those of the
    unscaled run exactly."""

    def run(reducer: object, scale: float | None) -> dict[str, Tensor]:
        model = worker.make_model("mlp")
        opt = curvlab.AdaFisher(model, lr=1e-2, reducer=reducer)
        scaler = torch.amp.GradScaler(
            "cpu", init_scale=scale or 1.0, growth_interval=10**6, enabled=scale is not None
        )
        opt.attach_grad_scaler(scaler)
        for x, y in worker.make_batches("mlp", [8, 8]):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        return {f"{n}.{k}": v for n, s in opt.curvature_state.items() for k, v in s.items()}

    reducer = TakingReducer()
    got, want = run(reducer, 2.0**12), run("none", None)
    assert reducer.taken and got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert "6" in reducer.taken and want["6.S"].abs().sum() > 0
