"""nn.TransformerEncoder / nn.TransformerDecoder under curvlab (plugins/adapters/attention.py).

* Every trainable parameter is covered (``fallback_parameters()`` empty), self- and
  cross-attention (kdim ≠ vdim ≠ embed_dim too), and the loss goes down on a learnable task.
* Training-mode forwards with the capture on are the unhooked model's (outputs and gradients to
  1e-12 in float64, dropout > 0 under the same seed), both ``batch_first``, ``norm_first`` both
  ways, with masks; eval / no-grad forwards (nested tensors, fast paths) never reach the
  observed forward and are bitwise the unhooked model's.
* Detaching removes every hook and forward override (idempotently); deep copies and pickled
  copies of a hooked transformer run their own forward and add nothing.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.capture import CapturingForward
from curvlab.optimizer import PAPER_ADAPTERS
from curvlab.plugins.adapters import attention

# torch's own notes: mixed mask types, nested tensors unavailable for these layouts
pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched:UserWarning"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning"),
]

DT = torch.float64
VOCAB, D, HEADS, T, B = 11, 16, 2, 7, 6


class EncoderLM(nn.Module):
    """Tokens → embedding → TransformerEncoder (causal) → logits."""

    def __init__(
        self, batch_first: bool, norm_first: bool, dropout: float = 0.0, layers: int = 2
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(
            D, HEADS, 2 * D, dropout=dropout, batch_first=batch_first, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens, padding=None):
        x = self.emb(tokens if self.batch_first else tokens.T)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=x.dtype)
        h = self.encoder(x, mask=mask, src_key_padding_mask=padding, is_causal=True)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h)


class Seq2Seq(nn.Module):
    """Encoder-decoder: the decoder's cross-attention reads the encoder's memory."""

    def __init__(self, batch_first: bool, norm_first: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, D)
        self.transformer = nn.Transformer(
            D,
            HEADS,
            1,
            2,
            2 * D,
            dropout=dropout,
            batch_first=batch_first,
            norm_first=norm_first,
        )
        self.head = nn.Linear(D, VOCAB)

    def forward(self, src, tgt, src_padding=None):
        s, t = self.emb(src), self.emb(tgt)
        if not self.batch_first:
            s, t = s.transpose(0, 1), t.transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=s.dtype)
        h = self.transformer(
            s,
            t,
            tgt_mask=mask,
            src_key_padding_mask=src_padding,
            memory_key_padding_mask=src_padding,
            tgt_is_causal=True,
        )
        return self.head(h if self.batch_first else h.transpose(0, 1))


class CrossAttentionNet(nn.Module):
    """Queries attend to keys and values of other widths: kdim ≠ vdim ≠ embed_dim."""

    def __init__(self) -> None:
        super().__init__()
        self.q_in, self.k_in, self.v_in = nn.Linear(3, D), nn.Linear(3, 5), nn.Linear(3, 9)
        self.attn = nn.MultiheadAttention(D, HEADS, kdim=5, vdim=9, batch_first=True)
        self.head = nn.Linear(D, 1)

    def forward(self, x, padding=None):
        y, _ = self.attn(self.q_in(x), self.k_in(x), self.v_in(x), key_padding_mask=padding)
        return self.head(y).squeeze(-1)


def tokens(seed: int, n: int = B) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def padding(seed: int, n: int = B) -> torch.Tensor:
    pad = torch.rand(n, T, generator=torch.Generator().manual_seed(seed)) < 0.3
    pad[:, 0] = False
    return pad


def lm_loss(logits, tok):
    """Predict the previous token (learnable with causal attention)."""
    return F.cross_entropy(logits[:, 1:].reshape(-1, VOCAB), tok[:, :-1].reshape(-1))


def make(kind: str, batch_first: bool = True, norm_first: bool = False, dropout: float = 0.0):
    torch.manual_seed(0)
    if kind == "encoder":
        return EncoderLM(batch_first, norm_first, dropout).double()
    if kind == "seq2seq":
        return Seq2Seq(batch_first, norm_first, dropout).double()
    return CrossAttentionNet().double()


def loss_fn(kind: str, model: nn.Module, seed: int) -> torch.Tensor:
    tok = tokens(seed)
    if kind == "encoder":
        return lm_loss(model(tok, padding(seed + 100)), tok)
    if kind == "seq2seq":  # reverse the source
        return lm_loss(model(tok, tok.flip(1), padding(seed + 100)), tok.flip(1))
    x = torch.randn(B, T, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return F.mse_loss(model(x, padding(seed + 100)), x[..., 0].cumsum(1) / T)


KINDS = [
    ("encoder", True, False),
    ("encoder", False, True),
    ("encoder", True, True),
    ("encoder", False, False),
    ("seq2seq", True, True),
    ("seq2seq", False, False),
    ("cross", True, False),
]
IDS = [f"{k}-{'bf' if b else 'sf'}-{'prenorm' if n else 'postnorm'}" for k, b, n in KINDS]


@pytest.mark.parametrize("kind,batch_first,norm_first", KINDS, ids=IDS)
def test_training_forward_is_exact_and_every_parameter_is_covered(kind, batch_first, norm_first):
    model = make(kind, batch_first, norm_first, dropout=0.2)
    plain = copy.deepcopy(model)
    opt = curvlab.AdaFisherW(model)
    assert opt.fallback_parameters() == []
    for m in (model, plain):
        torch.manual_seed(7)
        loss_fn(kind, m, seed=1).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)
    assert all(r.has_statistics for r in opt.layers), [
        r.name for r in opt.layers if not r.has_statistics
    ]
    opt.step()
    assert opt.fallback_parameters() == []  # nothing "never captured" either
    n_attention = sum(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    blocks = [r for r in opt.layers if r.name.endswith(("q_proj", "k_proj", "v_proj"))]
    assert len(blocks) == 3 * n_attention > 0


@pytest.mark.parametrize(
    "kind,batch_first,norm_first", KINDS[:2] + KINDS[4:], ids=IDS[:2] + IDS[4:]
)
def test_loss_goes_down(kind, batch_first, norm_first):
    model = make(kind, batch_first, norm_first)
    opt = curvlab.AdaFisherW(model, lr=3e-3 if kind != "cross" else 1e-3)
    losses = []
    for step in range(20):
        opt.zero_grad()
        loss = loss_fn(kind, model, seed=step % 4)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.fallback_parameters() == []
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses


def eval_outputs(model: nn.Module, x, pad) -> list[torch.Tensor]:
    """eval + no grad (nested tensors, fused paths), eval with grad, training without grad."""
    model.eval()
    with torch.no_grad():
        out = [model(x, src_key_padding_mask=pad)]
    out.append(model(x, src_key_padding_mask=pad).detach())
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        out.append(model(x, src_key_padding_mask=pad))
    return out


@pytest.mark.parametrize("batch_first", [True, False])
def test_eval_and_no_grad_paths_are_untouched(batch_first, monkeypatch):
    """Nested tensors and the fused fast paths run only in eval / no-grad, where the capture is
    off: the module's own forward runs and the observed forward is never called.

    With the attention adapter alone the outputs are bitwise the unhooked model's. With every
    default adapter they are bitwise those of the model hooked without the attention adapter:
    the forward hooks of the Linear / LayerNorm layers (not this adapter) make
    ``TransformerEncoderLayer`` skip its fused eval kernel, which rounds differently in float32.
    """
    calls = []
    original = attention.observed_forward
    monkeypatch.setattr(
        attention, "observed_forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=0.1, batch_first=batch_first)
    base = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)  # float32: fast paths
    x = torch.randn(B, T, D) if batch_first else torch.randn(T, B, D)
    pad = padding(3)
    attention_only, everything, others = (copy.deepcopy(base) for _ in range(3))
    others_names = [a for a in PAPER_ADAPTERS if a != "multihead_attention"]
    with pytest.warns(curvlab.CurvatureFallbackWarning):
        kept = [curvlab.AdaFisher(attention_only, adapters=["multihead_attention"])]
    kept.append(curvlab.AdaFisher(everything))  # kept alive: a dropped optimizer unhooks
    with pytest.warns(curvlab.CurvatureFallbackWarning):
        kept.append(curvlab.AdaFisher(others, adapters=others_names))
    assert all(hooks_left(m) for m in (attention_only, everything, others))
    for a, b in zip(eval_outputs(attention_only, x, pad), eval_outputs(base, x, pad)):
        assert torch.equal(a, b)
    for a, b in zip(eval_outputs(everything, x, pad), eval_outputs(others, x, pad)):
        assert torch.equal(a, b)
    assert calls == []


def hooks_left(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if "forward" in m.__dict__:
            out.append(f"{name}: forward override")
        if m._forward_hooks or m._forward_pre_hooks:
            out.append(f"{name}: hooks")
    return out


def test_detach_removes_everything_and_is_idempotent():
    model = make("seq2seq")
    plain = copy.deepcopy(model)
    opt = curvlab.AdaFisherW(model)
    assert any("forward override" in h for h in hooks_left(model))
    opt.close()
    assert hooks_left(model) == []
    opt.close()  # again: nothing to remove, nothing fails
    opt.backend.detach()
    assert hooks_left(model) == []
    for m in (model, plain):
        torch.manual_seed(3)
        loss_fn("seq2seq", m, seed=2).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)  # the module's own forward again, bitwise
    assert not any(r.has_statistics for r in opt.layers)


def test_detach_restores_a_forward_set_before():
    mha = nn.MultiheadAttention(D, HEADS)
    marker = mha.forward  # a bound method stored on the instance, e.g. by another library
    mha.forward = marker
    opt = curvlab.AdaFisher(mha)
    assert isinstance(mha.__dict__["forward"], CapturingForward)
    opt.backend.detach()
    assert mha.__dict__["forward"] is marker


def copies(model: nn.Module) -> dict[str, nn.Module]:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(buffer, weights_only=False),
    }


def test_copies_of_a_hooked_transformer_are_inert(monkeypatch):
    calls = []
    original = attention.observed_forward
    monkeypatch.setattr(
        attention, "observed_forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model = make("seq2seq", dropout=0.1)
    plain = copy.deepcopy(model)
    opt = curvlab.AdaFisherW(model)
    for name, twin in copies(model).items():
        assert isinstance(twin.transformer.encoder.layers[0].self_attn.forward, CapturingForward)
        for m in (twin, plain):
            torch.manual_seed(5)
            loss_fn("seq2seq", m, seed=4).backward()
        for p, q in zip(twin.parameters(), plain.parameters()):
            assert torch.equal(p.grad, q.grad), name
        plain.zero_grad()
        assert calls == [], name
        assert not any(r.has_statistics for r in opt.layers), name
    loss_fn("seq2seq", model, seed=4).backward()  # the original still captures
    assert calls and all(r.has_statistics for r in opt.layers)
    opt.step()


@pytest.mark.slow
def test_compiled_attention_gives_the_eager_factors():
    """torch.compile (aot_eager) traces the observed forward: the same factors and updates
    (each observed block's output hook is a graph break, as for any layer: tests/test_compile.py).
    Two steps at curvature_interval=2: the compiled graphs follow the capture flag."""
    torch._dynamo.reset()
    try:
        results = []
        x = torch.randn(B, T, 3, generator=torch.Generator().manual_seed(0))
        for compiled in (False, True):
            torch.manual_seed(0)
            model = CrossAttentionNet()
            opt = curvlab.AdaFisherW(model, lr=1e-2, curvature_interval=2)
            net = torch.compile(model, backend="aot_eager") if compiled else model
            history = []
            for _ in range(2):
                opt.zero_grad()
                F.mse_loss(net(x), x[..., 0]).backward()
                history.append({r.name: r.has_statistics for r in opt.layers})
                opt.step()
            results.append((model, opt, history))
        (m1, o1, h1), (m2, o2, h2) = results
        assert h1 == h2 and all(h1[0].values()) and not any(h1[1].values())
        assert o1.curvature_state.keys() == o2.curvature_state.keys()
        assert "attn.q_proj" in o2.curvature_state
        for name, state in o1.curvature_state.items():
            for key in ("H", "S"):
                torch.testing.assert_close(
                    o2.curvature_state[name][key], state[key], rtol=1e-5, atol=1e-7
                )
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
