"""Model registry. Every model takes float images in [0, 1] (N, C, H, W) and returns logits;
normalisation lives inside the model so data can stay uint8 until the model's input."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from .registry import Registry

MODELS: Registry = Registry("model")

# Images at or below this size get the CIFAR-style stem (3x3 stride-1 first conv).
SMALL_IMAGE = 64


class Normalize(nn.Module):
    def __init__(self, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _resnet(factory):
    def build(num_classes: int, image_size: int) -> nn.Module:
        net = factory(num_classes=num_classes)
        if image_size <= SMALL_IMAGE:
            # CIFAR stem as in the BaDLoss reference code: 3x3 stride-1 conv; the max-pool is kept.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        return nn.Sequential(Normalize(), net)

    return build


for _name in ("resnet18", "resnet34", "resnet50"):
    MODELS.register(_name)(_resnet(getattr(torchvision.models, _name)))


@MODELS.register("smallcnn")
def smallcnn(num_classes: int, image_size: int) -> nn.Module:
    """A fast CPU model for the demo: three conv blocks and global pooling (about 25 k parameters)."""

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(
        Normalize(),
        block(3, 16), nn.MaxPool2d(2),
        block(16, 32), nn.MaxPool2d(2),
        block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    return MODELS.get(name, "model")(num_classes, image_size)
