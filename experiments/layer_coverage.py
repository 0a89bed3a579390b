"""Curvature coverage of common models, and the LSTM fallback study (docs/layers.md).

``python -m curvlab.experiments.layer_coverage table`` prints the coverage table: the share of
trainable elements with layer curvature under ``curvlab.AdaFisherW(model)`` at its defaults,
before (the adapter list of curvlab 0.1.0) and now, for tiny transformers models built from
config objects (no download), the torch models of ``experiments/coverage_models.py``
(transformer encoders, cross-attention, Conv1d/Conv3d nets, a U-Net block, an MLP with
``nn.RMSNorm``) and an LSTM language model.

``python -m curvlab.experiments.layer_coverage lstm --out DIR`` trains the LSTM language model
on the standard-library byte corpus with AdaFisherW under the ``identity`` and the
``squared_gradient`` fallback (and AdamW as a reference) for a fixed number of steps, and
reports how far each group of weights moved, ``‖θ_T − θ_0‖ / ‖θ_0‖``, and the validation loss.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import curvlab
from curvlab.coverage import percent
from curvlab.experiments.coverage_models import TASKS

#: the default adapters of curvlab 0.1.0, before the layer-coverage work (Conv1d/3d,
#: transposed convolutions, MultiheadAttention, RMS-type norms, transformers' Conv1D)
ADAPTERS_BEFORE = ("linear", "conv2d", "batchnorm", "layernorm", "groupnorm", "embedding")


class LSTMLM(nn.Module):
    """Token embedding → LSTM → Linear head: the LSTM's weights have no layer adapter."""

    def __init__(
        self,
        vocab_size: int = 256,
        d_embed: int = 64,
        hidden: int = 128,
        layers: int = 1,
        context: int = 64,
    ) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, d_embed)
        self.lstm = nn.LSTM(d_embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


# -- coverage table ---------------------------------------------------------------------------
def tiny_models() -> dict[str, Callable[[], nn.Module]]:
    """Name → factory of the models in the coverage table (transformers ones from configs)."""

    def gpt2() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(
            GPT2Config(
                n_embd=64,
                n_layer=2,
                n_head=4,
                vocab_size=256,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )

    def bert() -> nn.Module:
        from transformers import BertConfig, BertForMaskedLM

        return BertForMaskedLM(
            BertConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=256,
                max_position_embeddings=64,
            )
        )

    def llama() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(
            LlamaConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                vocab_size=256,
                max_position_embeddings=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )

    return {
        "GPT-2 (`GPT2LMHeadModel`, 2 layers, d 64)": gpt2,
        "BERT (`BertForMaskedLM`, 2 layers, d 64)": bert,
        "Llama (`LlamaForCausalLM`, 2 layers, d 64)": llama,
        **{name: task.build for name, task in TASKS.items()},
        "LSTM LM (embedding 64, LSTM 128, head)": lambda: LSTMLM(),
    }


def coverages(factory: Callable[[], nn.Module]) -> tuple[curvlab.Coverage, curvlab.Coverage]:
    """(before, now) coverage of ``factory()`` under AdaFisherW's defaults."""
    torch.manual_seed(0)
    model = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvlab.CurvatureFallbackWarning)
        before = curvlab.AdaFisherW(model, adapters=ADAPTERS_BEFORE).coverage()
        now = curvlab.AdaFisherW(model).coverage()
    return before, now


def _uncovered(cov: curvlab.Coverage) -> str:
    kinds = sorted({f.reason.removeprefix("no adapter for ").split()[0] for f in cov.fallback})
    return ", ".join(kinds) or "—"


def coverage_table() -> str:
    """The markdown table of docs/layers.md ("Measured coverage")."""
    lines = [
        "| model | trainable elements | before: share | before: uncovered | now: share "
        "| now: uncovered |",
        "|---|---|---|---|---|---|",
    ]
    for name, factory in tiny_models().items():
        before, now = coverages(factory)
        lines.append(
            f"| {name} | {now.total_elements:,} | {percent(before.share)} | {_uncovered(before)} "
            f"| {percent(now.share)} | {_uncovered(now)} |"
        )
    return "\n".join(lines)


# -- LSTM study -------------------------------------------------------------------------------
GROUPS = {"LSTM": "lstm.", "Embedding": "embed.", "Linear head": "head."}


def relative_moves(initial: dict[str, torch.Tensor], model: nn.Module) -> dict[str, float]:
    """‖θ_T − θ_0‖ / ‖θ_0‖ per group of parameters (all tensors of the group together)."""
    out = {}
    current = dict(model.named_parameters())
    for group, prefix in GROUPS.items():
        names = [n for n in initial if n.startswith(prefix)]
        delta = torch.cat([(current[n].detach() - initial[n]).reshape(-1) for n in names])
        start = torch.cat([initial[n].reshape(-1) for n in names])
        out[group] = float(delta.norm() / start.norm())
    return out


def lstm_run(optimizer: str, steps: int, seed: int, lr: float) -> dict[str, Any]:
    """One LSTM-LM run: validation loss after ``steps`` steps and the relative moves."""
    from curvlab.experiments.data.stdlib_corpus import stdlib_corpus
    from curvlab.experiments.train_lm import train_lm

    holder: dict[str, Any] = {}

    def model(vocab_size: int) -> nn.Module:
        net = LSTMLM(vocab_size=vocab_size)
        holder["net"] = net
        holder["initial"] = {n: p.detach().clone() for n, p in net.named_parameters()}
        return net

    def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
        if optimizer == "adamw":
            return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", curvlab.CurvatureFallbackWarning)
            return curvlab.AdaFisherW(net, lr=lr, weight_decay=0.01, fallback=optimizer)

    summary = train_lm(
        model=model,
        data=stdlib_corpus,
        optimizer=make_optimizer,
        steps=steps,
        batch_size=16,
        seed=seed,
        eval_every=steps,
        eval_tokens=16384,
        final_eval_tokens=65536,
        evaluate_test=False,
        num_threads=1,
        quiet=True,
    )
    return dict(
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        steps=steps,
        val_loss=summary["val_loss"],
        train_loss=summary["train_loss"],
        step_time_ms=summary["step_time_ms"],
        moves=relative_moves(holder["initial"], holder["net"]),
    )


def lstm_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| optimizer | fallback | lr | val loss (nats/byte) | ‖Δθ‖/‖θ₀‖ LSTM | Embedding "
        "| Linear head |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "AdamW" if r["optimizer"] == "adamw" else "AdaFisherW"
        fallback = "—" if r["optimizer"] == "adamw" else f"`{r['optimizer']}`"
        m = r["moves"]
        lines.append(
            f"| {name} | {fallback} | {r['lr']:g} | {r['val_loss']:.3f} | {m['LSTM']:.4f} "
            f"| {m['Embedding']:.4f} | {m['Linear head']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("table", help="print the coverage table")
    lstm = sub.add_parser("lstm", help="run the LSTM fallback study")
    lstm.add_argument("--steps", type=int, default=1500)
    lstm.add_argument("--seed", type=int, default=0)
    lstm.add_argument("--lr", type=float, default=1e-3, help="AdaFisherW's learning rate")
    lstm.add_argument("--adamw-lr", type=float, default=3e-3)
    lstm.add_argument("--out", default=None, help="write results.json and table.md here")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(coverage_table())
        return
    rows = [
        lstm_run("identity", args.steps, args.seed, args.lr),
        lstm_run("squared_gradient", args.steps, args.seed, args.lr),
        lstm_run("adamw", args.steps, args.seed, args.adamw_lr),
    ]
    table = lstm_table(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
