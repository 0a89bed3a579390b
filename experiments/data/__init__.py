"""Datasets. Embedded real data (scikit-learn digits, iris) needs no download; MNIST-1D is
generated offline by the ``mnist1d`` package (extra ``data``); CIFAR-10/100 and WikiText-2 are
read from a local directory; a synthetic CIFAR-shaped set serves tests."""

from curvlab.experiments.data.augment import CifarAugment
from curvlab.experiments.data.cifar import cifar10, cifar100
from curvlab.experiments.data.embedded import Split, digits, iris
from curvlab.experiments.data.mnist1d import mnist1d
from curvlab.experiments.data.synthetic import synthetic_cifar
from curvlab.experiments.data.wikitext import TextSplit, wikitext2

__all__ = [
    "CifarAugment",
    "Split",
    "TextSplit",
    "cifar10",
    "cifar100",
    "digits",
    "iris",
    "mnist1d",
    "synthetic_cifar",
    "wikitext2",
]
