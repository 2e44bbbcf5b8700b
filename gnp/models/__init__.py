"""The model zoo: a registry of builders, one file per family.

Every model uses leaky ReLU (slope 0.01) so no neuron dies, is built without touching
the global RNG (parameters are created on the meta device, then initialised from a
local generator), and gets its masks attached, so its state_dict holds weights and
masks. `model.spec` records how it was built, so a fresh copy can be made from it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gnp.masks import Masks
from gnp.models.init import LEAKY_SLOPE, init_parameters
from gnp.models.lenet import LeNet5, LeNet5Caffe, LeNet300100
from gnp.models.resnet import ResNet18
from gnp.models.spec import ModelSpec
from gnp.models.speech import DeepSpeech2, SpeechConfig, deepspeech2_hlstm, deepspeech2_hlstm_tiny

__all__ = ["ModelSpec", "MODELS", "build_model", "register", "init_parameters",
           "LeNet300100", "LeNet5", "LeNet5Caffe", "ResNet18", "LEAKY_SLOPE", "DeepSpeech2",
           "SpeechConfig", "SPEECH_MODELS"]

Builder = Callable[[ModelSpec], nn.Module]

MODELS: dict[str, Builder] = {
    "lenet-300-100": LeNet300100,
    "lenet-5": LeNet5,
    "lenet-5-caffe": LeNet5Caffe,
    "resnet-18": ResNet18,
    "deepspeech2-hlstm": deepspeech2_hlstm,  # input_shape (n_mfcc,), num_classes = CTC symbols
    "deepspeech2-hlstm-tiny": deepspeech2_hlstm_tiny,
}


SPEECH_MODELS = ("deepspeech2-hlstm", "deepspeech2-hlstm-tiny")  # (x, lengths) -> CTC outputs


def register(name: str, builder: Builder) -> None:
    """Add a model family to the registry (its modules must be initialisable, see init.py)."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = builder


def build_model(name: str, input_shape: tuple[int, ...] | list[int] = (1, 28, 28),
                num_classes: int = 10, seed: int = 0) -> nn.Module:
    """Build a registered model with masks attached, initialised from `seed` (local RNG).

    Raises:
        ValueError: unknown name, input_shape not positive sizes ((C, H, W) for images,
            (n_mfcc,) for speech), or
            num_classes < 2.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape must be positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    spec = ModelSpec(name, input_shape, int(num_classes))
    with torch.device("meta"):  # no draws from the global RNG while modules are built
        model = MODELS[name](spec)
    model.to_empty(device="cpu")
    init_parameters(model, torch.Generator().manual_seed(int(seed)))
    model.spec = spec
    Masks.attach(model)
    return model
