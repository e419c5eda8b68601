"""The paper's published settings (../shared/greg-spec.md) as ``greg-fast prune --recipe NAME``:
model, data, ratios, schedule and fine-tune flags; flags given on the command line override them.
Each recipe carries the paper's reported figures so that a run's summary can stand beside them."""
from __future__ import annotations

from dataclasses import dataclass, field

from .table import format_table

# Schedule and fine-tune settings of the reference, per dataset family.
_CIFAR = {"interval": 10, "stabilize": 10000, "weight_decay": 5e-4, "finetune_epochs": 120,
          "lr_ft": "0:0.01,60:0.001,90:0.0001", "batch_size": 128}
_IMAGENET = {"interval": 5, "stabilize": 40000, "weight_decay": 1e-4, "finetune_epochs": 90,
             "lr_ft": "0:0.01,30:0.001,60:0.0001,75:0.00001", "batch_size": 256}
_COMMON = {"delta": 1e-4, "ceiling": 1.0, "pick_delta": 1e-5, "pick_ceiling": 1e-2, "recover": -1e-4,
           "mag_ratio_limit": 1000.0, "lr_reg": 1e-3, "momentum": 0.9, "granularity": "filter",
           "coupled": False}  # the reference prunes single layers: residual streams stay whole


@dataclass(frozen=True)
class Recipe:
    description: str
    flags: dict                       # argparse destinations -> values
    paper: dict = field(default_factory=dict)  # speedup (FLOPs), top-1 base / GReg-1 / GReg-2

    def defaults(self) -> dict:
        family = _IMAGENET if self.flags["data"] == "imagefolder" else _CIFAR
        return {**_COMMON, **family, **self.flags}


RECIPES = {
    "resnet56-cifar10": Recipe(
        "ResNet-56, CIFAR-10",
        {"model": "resnet56", "data": "cifar10", "stage_ratios": [0, 0.75, 0.75, 0.32, 0]},
        {"speedup": 2.55, "base": 93.36, "greg1": 93.18, "greg2": 93.36}),
    "vgg19-cifar100": Recipe(
        "VGG-19-BN, CIFAR-100; 0.7 on convs 1..15",
        {"model": "vgg19_bn_cifar", "data": "cifar100", "ratio": 0.7, "skip": ["features.0"]},
        {"speedup": 8.84, "base": 74.02, "greg1": 67.55, "greg2": 67.75}),
    "resnet34-imagenet": Recipe(
        "ResNet-34, ImageNet; blocks 1.0 2.0 2.3 3.0 3.5 whole",
        {"model": "resnet34", "data": "imagefolder", "stage_ratios": [0, 0.5, 0.6, 0.4, 0, 0],
         "skip": ["layer1.0.*", "layer2.0.*", "layer2.3.*", "layer3.0.*", "layer3.5.*"]},
        {"speedup": 1.32, "base": 73.31, "greg1": 73.54, "greg2": 73.61}),
    "resnet50-imagenet-2.31x": Recipe(
        "ResNet-50, ImageNet",
        {"model": "resnet50", "data": "imagefolder", "stage_ratios": [0, 0.6, 0.6, 0.6, 0.21, 0]},
        {"speedup": 2.31, "base": 76.13, "greg1": 75.16, "greg2": 75.36}),
    "resnet50-imagenet-2.56x": Recipe(
        "ResNet-50, ImageNet",
        {"model": "resnet50", "data": "imagefolder", "stage_ratios": [0, 0.74, 0.74, 0.6, 0.21, 0]},
        {"speedup": 2.56, "base": 76.13}),
    "resnet50-imagenet-3.06x": Recipe(
        "ResNet-50, ImageNet",
        {"model": "resnet50", "data": "imagefolder", "stage_ratios": [0, 0.68, 0.68, 0.68, 0.5, 0]},
        {"speedup": 3.06, "base": 76.13, "greg1": 73.75, "greg2": 73.90}),
}


def table() -> str:

    rows = [("recipe", "model, data (ImageNet: --data imagefolder)", "FLOPs speed-up", "top-1 base", "GReg-1", "GReg-2")]
    for name, r in RECIPES.items():
        p = r.paper
        rows.append((name, r.description, f"{p['speedup']:.2f}x", f"{p['base']:.2f}",
                     *(f"{p[m]:.2f}" if m in p else "-" for m in ("greg1", "greg2"))))
    return format_table(rows, right=(2, 3, 4, 5))
