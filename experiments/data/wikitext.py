"""WikiText-2 from local raw files (nothing is downloaded).

Expected in ``ROOT`` (or ``ROOT/wikitext-2`` / ``ROOT/wikitext-2-raw``): ``wiki.train.tokens``,
``wiki.valid.tokens``, ``wiki.test.tokens`` — or the raw release's ``wiki.train.raw``,
``wiki.valid.raw``, ``wiki.test.raw``. ``ROOT`` defaults to ``$CURVLAB_DATA`` or ``./data``.

Tokenisation: ``"bytes"`` (UTF-8 bytes, vocabulary 256, the small GPT's default) or ``"words"``
(whitespace tokens plus ``<eos>`` per line, vocabulary from the training split; words unseen in
training map to ``<unk>``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import gin
import torch
from torch import Tensor

from curvlab.experiments.data.cifar import default_root

SPLITS = ("train", "valid", "test")
FOLDERS = ("", "wikitext-2", "wikitext-2-raw", "wikitext-2-v1", "wikitext-2-raw-v1")


class TextSplit(NamedTuple):
    """Token streams (1-D LongTensors) of a language-modelling corpus."""

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab_size: int
    vocab: tuple[str, ...] | None = None  # None for bytes


def find_wikitext2(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The three split files, or FileNotFoundError naming what was expected where."""
    root = Path(root) if root is not None else default_root()
    for folder in FOLDERS:
        for suffix in ("tokens", "raw"):
            paths = {s: root / folder / f"wiki.{s}.{suffix}" for s in SPLITS}
            if all(p.is_file() for p in paths.values()):
                return paths
    names = ", ".join(f"wiki.{s}.tokens" for s in SPLITS)
    raw = ", ".join(f"wiki.{s}.raw" for s in SPLITS)
    raise FileNotFoundError(
        f"WikiText-2 not found: expected the files {names} (or {raw}) in the directory "
        f"{root.resolve()} or its subfolder wikitext-2/ or wikitext-2-raw/. Nothing is "
        f"downloaded: place the files there, pass root=... (gin: data.wikitext2.root = '...') "
        f"or set $CURVLAB_DATA."
    )


@gin.configurable(module="data")
def wikitext2(root: str | os.PathLike | None = None, tokenizer: str = "bytes") -> TextSplit:
    """WikiText-2 as token streams; see the module docstring for files and tokenisation."""
    if tokenizer not in ("bytes", "words"):
        raise ValueError(f"tokenizer must be 'bytes' or 'words', got {tokenizer!r}")
    paths = find_wikitext2(root)
    texts = {s: p.read_text(encoding="utf-8") for s, p in paths.items()}
    if tokenizer == "bytes":
        streams = {
            s: torch.frombuffer(bytearray(t.encode("utf-8")), dtype=torch.uint8).long()
            for s, t in texts.items()
        }
        return TextSplit(streams["train"], streams["valid"], streams["test"], 256)

    def words(text: str) -> list[str]:
        return [w for line in text.splitlines() for w in (*line.split(), "<eos>")]

    tokens = {s: words(t) for s, t in texts.items()}
    vocab = ["<unk>", *sorted(set(tokens["train"]) - {"<unk>"})]
    index = {w: i for i, w in enumerate(vocab)}
    streams = {
        s: torch.tensor([index.get(w, 0) for w in ws], dtype=torch.long) for s, ws in tokens.items()
    }
    return TextSplit(streams["train"], streams["valid"], streams["test"], len(vocab), tuple(vocab))
