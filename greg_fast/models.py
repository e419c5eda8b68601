"""Model zoo: the reference's CIFAR ResNets and VGG-19-BN, and torchvision's ImageNet models.

Every model carries ``greg_input_size`` (C, H, W), the input shape ``plan`` uses for shape
propagation and FLOP counting when no ``example_inputs`` are given.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

__all__ = ["create", "names", "CifarResNet", "VGGCifar"]


class ShortcutA(nn.Module):
    """Option-A shortcut of the CIFAR ResNet paper: subsample by 2 and zero-pad the new channels.

    Parameter-free, as in the reference (there a lambda; here a module so that fx traces it).
    """

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, self.extra_channels - pad))


class BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity() if stride == 1 and in_planes == planes else ShortcutA(planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of 16/32/64 channels, option-A shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, in_planes = (16, 32, 64), 16
        for stage, planes in enumerate(widths, start=1):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlockA(in_planes, planes, 2 if stage > 1 and i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.avgpool(out), 1))


VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)


class VGGCifar(nn.Module):
    """VGG-19 with BatchNorm for 32x32 inputs (the CIFAR-100 model of the reference)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg=VGG19_CFG):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


_CIFAR = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}
# torchvision's ImageNet models (224x224), with the arguments a training-free build needs
_TORCHVISION = {name: {} for name in (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16_bn", "wide_resnet50_2",
    "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
    "regnet_y_400mf", "convnext_tiny", "squeezenet1_0", "shufflenet_v2_x1_0")}
_TORCHVISION["googlenet"] = {"aux_logits": False, "init_weights": True}


def names() -> list[str]:
    return [*_CIFAR, "vgg19_bn_cifar", *_TORCHVISION]


def create(name: str, num_classes: int = 10, *, in_channels: int = 3) -> nn.Module:
    """Build an untrained model by name (see ``names()``)."""
    if name in _CIFAR:
        model, size = CifarResNet(_CIFAR[name], num_classes, in_channels), 32
    elif name == "vgg19_bn_cifar":
        model, size = VGGCifar(num_classes, in_channels), 32
    elif name in _TORCHVISION:
        model, size = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **_TORCHVISION[name]), 224
        if in_channels != 3:
            _replace_stem(model, in_channels)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(names())}")
    model.greg_input_size = (in_channels, size, size)
    model.greg_arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels}  # for greg_fast.load
    return model


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap the first conv of a torchvision model for one taking ``in_channels`` inputs."""
    parent_name, stem = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                    bias=stem.bias is not None)
    owner = model.get_submodule(parent_name.rpartition(".")[0]) if "." in parent_name else model
    setattr(owner, parent_name.rpartition(".")[2], new)


@torch.no_grad()
def collapsed_convs(model: nn.Module, example: tuple) -> list[str]:
    """The convolutions with a kernel larger than 1 whose input ``example`` shrinks to a single
    pixel before them: the model was made for larger images than these (an ImageNet network on 8x8
    digits), so those kernels see mostly padding."""
    seen, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and any(k > 1 for k in m.kernel_size):
            handles.append(m.register_forward_hook(
                lambda m, args, out, name=name: seen.append(name) if all(s == 1 for s in args[0].shape[2:]) else None))
    was_training = model.training
    try:
        model.eval()(*example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return list(dict.fromkeys(seen))
