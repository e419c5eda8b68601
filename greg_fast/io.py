"""Saving and loading (compacted) models as plain tensors plus an architecture description.

The file holds the zoo name and constructor arguments, the width of every Conv/Linear/BatchNorm
(its weight's shape) and the state_dict: no pickled code, so ``torch.load(path, weights_only=True)``
reads it, and ``load`` rebuilds the model by shrinking a freshly created one to the saved widths.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from . import models
from .compaction import _set_widths
from .graph import LAYER_TYPES

FORMAT = "greg_fast.model/1"
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def widths(model: nn.Module) -> dict[str, list[int]]:
    """The weight shape of every Conv/Linear/BatchNorm: all a compacted model's architecture needs
    beyond its constructor."""
    return {name: list((m.weight if m.weight is not None else m.running_mean).shape)
            for name, m in model.named_modules() if isinstance(m, LAYER_TYPES + _NORMS)
            and (m.weight is not None or getattr(m, "running_mean", None) is not None)}


def save(model: nn.Module, path: str | Path, *, masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``model`` (dense or compacted; from ``greg_fast.models.create``) atomically to ``path``.
    ``masks`` (unstructured pruning) are stored beside the weights."""
    arch = getattr(model, "greg_arch", None)
    if arch is None:
        raise ValueError("greg_fast.save needs a model built by greg_fast.models.create (it records how to "
                         "rebuild it); for other models save model.state_dict() and greg_fast.io.widths(model)")
    obj = {"format": FORMAT, "arch": dict(arch), "input_size": list(getattr(model, "greg_input_size", [])),
           "widths": widths(model), "state_dict": model.state_dict(),
           "masks": {k: v.cpu() for k, v in (masks or {}).items()}}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: str | Path, map_location="cpu") -> nn.Module:
    """Rebuild a model written by :func:`save` (its masks, if any, are in ``model.greg_masks``)."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable greg_fast model file ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a greg_fast model file (expected format {FORMAT!r})")
    missing = [k for k in ("arch", "widths", "state_dict") if k not in obj]
    if missing or not isinstance(obj["arch"], dict) or not {"name", "num_classes", "in_channels"} <= obj["arch"].keys():
        raise ValueError(f"{path}: a damaged greg_fast model file (missing {missing or ['arch fields']})")
    model = models.create(obj["arch"]["name"], obj["arch"]["num_classes"], in_channels=obj["arch"]["in_channels"])
    resize(model, obj["widths"])
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the described architecture: {err}") from err
    model.greg_masks = obj["masks"]
    return model.to(map_location)


@torch.no_grad()
def resize(model: nn.Module, shapes: Mapping[str, list[int]]) -> None:
    """Give every listed Conv/Linear/BatchNorm fresh (uninitialized) tensors of the listed width."""
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        m = modules.get(name)
        if not isinstance(m, LAYER_TYPES + _NORMS):
            raise ValueError(f"the saved architecture has {name!r}, which is not a Conv/Linear/BatchNorm here")
        if isinstance(m, LAYER_TYPES):
            m.weight = nn.Parameter(m.weight.new_empty(shape))
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.new_empty(shape[0]))
        else:
            for attr in ("weight", "bias"):
                if getattr(m, attr) is not None:
                    setattr(m, attr, nn.Parameter(getattr(m, attr).new_empty(shape[0])))
            for attr in ("running_mean", "running_var"):
                if getattr(m, attr) is not None:
                    setattr(m, attr, getattr(m, attr).new_empty(shape[0]))
        _set_widths(m)
