"""Models written here (no torchvision)."""

from curvlab.experiments.models.gpt import GPT, gpt
from curvlab.experiments.models.mnist1d import (
    Mnist1dCNN,
    Mnist1dGRU,
    Mnist1dLogistic,
    Mnist1dMLP,
    mnist1d_cnn,
    mnist1d_gru,
    mnist1d_logistic,
    mnist1d_mlp,
)
from curvlab.experiments.models.mobilenet import MobileNetV3, mobilenet_v3_small
from curvlab.experiments.models.resnet import ResNet, resnet18, resnet50
from curvlab.experiments.models.small import MLP, DigitsCNN, digits_cnn, mlp
from curvlab.experiments.models.transformer_gpt import TransformerGPT, transformer_gpt

__all__ = [
    "GPT",
    "MLP",
    "DigitsCNN",
    "Mnist1dCNN",
    "Mnist1dGRU",
    "Mnist1dLogistic",
    "Mnist1dMLP",
    "MobileNetV3",
    "ResNet",
    "TransformerGPT",
    "digits_cnn",
    "gpt",
    "mlp",
    "mnist1d_cnn",
    "mnist1d_gru",
    "mnist1d_logistic",
    "mnist1d_mlp",
    "mobilenet_v3_small",
    "resnet18",
    "resnet50",
    "transformer_gpt",
]
