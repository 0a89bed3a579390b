"""Token windows of a language-model stream: training batches and evaluation.

Training draws ``batch_size`` random contiguous windows (start positions uniform, seeded);
evaluation reads non-overlapping ``context``-long windows, optionally an evenly spaced subset.
Losses are in nats per predicted token; bits per byte are ``loss / ln 2 / bytes_per_token``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN2 = math.log(2.0)


def windows(stream: Tensor, starts: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Inputs ``stream[s : s+length]`` and targets ``stream[s+1 : s+length+1]`` (int64)."""
    idx = starts[:, None] + torch.arange(length + 1)
    chunk = stream[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def sample_batch(
    stream: Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random contiguous windows (start positions uniform, seeded)."""
    high = len(stream) - context - 1
    if high <= 0:
        raise ValueError(f"training stream of {len(stream)} tokens is shorter than context+1")
    starts = torch.randint(0, high + 1, (batch_size,), generator=generator)
    return windows(stream, starts, context)


def eval_starts(n_tokens: int, context: int, max_tokens: int | None) -> Tensor:
    """Start positions of non-overlapping windows; with ``max_tokens``, an evenly spaced subset
    of about ``max_tokens // context`` of them (deterministic)."""
    n_windows = (n_tokens - 1) // context
    if n_windows <= 0:
        raise ValueError(f"evaluation stream of {n_tokens} tokens is shorter than context+1")
    all_starts = torch.arange(n_windows) * context
    if max_tokens is None or max_tokens >= n_windows * context:
        return all_starts
    k = max(1, max_tokens // context)
    pick = torch.linspace(0, n_windows - 1, k).round().long().unique()
    return all_starts[pick]


def evaluate_lm(
    model: nn.Module,
    stream: Tensor,
    context: int,
    max_tokens: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[float, int]:
    """(mean loss in nats per predicted token, number of predicted tokens)."""
    starts = eval_starts(len(stream), context, max_tokens)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            x, y = windows(stream, starts[i : i + batch_size], context)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
    model.train(was_training)
    return total / count, count


def lm_metrics(prefix: str, loss: float, bytes_per_token: float | None) -> dict[str, float]:
    out = {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 700.0))}
    if bytes_per_token:
        out[f"{prefix}_bpb"] = loss / LN2 / bytes_per_token
    return out
