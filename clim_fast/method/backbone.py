"""torchvision ResNets without the classifier: pooled, flattened features.

`width` is the channel count of the first stage (torchvision's ResNets: 64); the four stages have
width x 1/2/4/8 channels (x the block expansion). At 64 the model is torchvision's own; any other
width builds the same torchvision `ResNet` class with every stage scaled, so parameter names (and
an exported `state_dict`'s keys) are those of torchvision's model, only the shapes differ.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from clim_fast.config import ARCHS
from shards.errors import UserError

# arch -> (block, blocks per stage, groups, width_per_group), as in torchvision.models.resnet
SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 1, 128),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
}
assert tuple(SPECS) == ARCHS, "config.ARCHS names the architectures SPECS builds"
STANDARD_WIDTH = 64
SMALL_IMAGE = 96  # below this the ImageNet stem would shrink a 32 px input to 8 px before layer1


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d without its count of training batches: with a fixed `momentum` (0.1) the
    count is never read, and each increment is one more kernel launch per layer and call (a
    clim_multires step calls every layer 14 times). The buffer stays, so `state_dict` keys are
    torchvision's (the count stays 0)."""

    def forward(self, x):
        if not (self.training and self.track_running_stats and self.momentum is not None):
            return super().forward(x)
        self._check_input_dim(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum,
                            self.eps)


def uses_cifar_stem(image_size: int) -> bool:
    return image_size < SMALL_IMAGE


class ScaledResNet(ResNet):
    """torchvision's ResNet with `width` channels in the first stage instead of 64 (stages
    width x 1/2/4/8). Same modules, same names, same initialisation as torchvision's."""

    def __init__(self, block, layers, width: int, groups: int = 1, width_per_group: int = 64,
                 num_classes: int = 1000):
        nn.Module.__init__(self)
        self._norm_layer = BatchNorm2d
        self.inplanes, self.dilation = width, 1
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def resnet(arch: str, width: int = STANDARD_WIDTH, num_classes: int = 1000) -> ResNet:
    """The full torchvision-layout ResNet (with fc) of `arch` at `width`: what an exported
    state_dict of a non-standard width loads into (with strict=False, fc aside)."""
    if arch not in SPECS:
        raise UserError(f"--arch {arch}: unknown architecture; choose from {', '.join(ARCHS)}")
    if width == STANDARD_WIDTH:
        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, norm_layer=BatchNorm2d)
    block, layers, groups, per_group = SPECS[arch]
    if width <= 0 or (block is Bottleneck and int(width * per_group / 64) * groups < groups):
        raise UserError(f"width={width}: too narrow for {arch} (its bottleneck would have no channels)")
    return ScaledResNet(block, layers, width, groups, per_group, num_classes)


def build_backbone(arch: str, image_size: int, width: int = STANDARD_WIDTH) -> tuple[nn.Module, int]:
    """(ResNet with fc = Identity, feature dim). A CIFAR-style stem (3x3 stride-1 conv, no maxpool)
    for images under 96 px; its state_dict keys stay those of torchvision's ResNet."""
    net = resnet(arch, width)
    if uses_cifar_stem(image_size):
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim
