"""torchvision ResNets without the classifier: pooled, flattened features."""

from __future__ import annotations

import torch.nn as nn
import torchvision

from shards.errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d")
SMALL_IMAGE = 96  # below this the ImageNet stem would shrink a 32 px input to 8 px before layer1


def uses_cifar_stem(image_size: int) -> bool:
    return image_size < SMALL_IMAGE


def build_backbone(arch: str, image_size: int) -> tuple[nn.Module, int]:
    """(ResNet with fc = Identity, feature dim). A CIFAR-style stem (3x3 stride-1 conv, no maxpool)
    for images under 96 px; its state_dict keys stay those of torchvision's ResNet."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: unknown architecture; choose from {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if uses_cifar_stem(image_size):
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim
