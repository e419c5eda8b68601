"""Saving and loading (compacted) models as plain tensors plus an architecture description.

The file holds the width of every Conv/Linear/BatchNorm (its weight's shape), the state_dict and,
for models of the zoo, their name and constructor arguments: no pickled code, so
``torch.load(path, weights_only=True)`` reads it. ``load`` shrinks a freshly built model to the
saved widths and loads the weights: one it builds itself (zoo models) or the one you pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from . import models
from .atomic import save_atomic
from .compaction import set_widths
from .groups.stored import set_attribute, stored_of
from .exact import OPS, Count, counts_of, keep_counts
from .capture import LAYER_TYPES, NORM_TYPES, unwrap

FORMAT = "greg_fast.model/1"


def widths(model: nn.Module) -> dict[str, list[int]]:
    """The weight shape of every Conv/Linear/BatchNorm: all a compacted model's architecture needs
    beyond its constructor."""
    return {name: list((m.weight if m.weight is not None else m.running_mean).shape)
            for name, m in model.named_modules() if isinstance(m, LAYER_TYPES + NORM_TYPES)
            and (m.weight is not None or getattr(m, "running_mean", None) is not None)}


def architecture(model: nn.Module) -> dict:
    """What a compacted model's architecture needs beyond its constructor: the widths, the counts its
    exact ops keep and the widths its modules store (what :func:`rebuild` takes back)."""
    return {"widths": widths(model), "counts": counts_of(model), "stored": stored_of(model)}


def save(model: nn.Module, path: str | Path, *, masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``model`` (dense or compacted, any architecture) atomically to ``path``. ``masks``
    (unstructured pruning) are stored beside the weights. A zoo model (``greg_fast.models.create``)
    records how to rebuild it; any other is rebuilt by ``load(path, model=YourNet())``."""
    model = unwrap(model)
    arch = getattr(model, "greg_arch", None)
    obj = {"format": FORMAT, "arch": dict(arch) if arch is not None else None,
           "model_class": type(model).__name__,
           "input_size": list(getattr(model, "greg_input_size", [])),
           **architecture(model),
           "state_dict": model.state_dict(),
           "masks": {k: v.cpu() for k, v in (masks or {}).items()}}
    save_atomic(obj, Path(path))


def load(path: str | Path, map_location="cpu", *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save` (its masks, if any, are in ``model.greg_masks``).
    ``model``: a freshly built instance of the saved architecture, shrunk in place to the saved
    widths and returned (needed for models that are not from the zoo)."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable greg_fast model file ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a greg_fast model file (expected format {FORMAT!r})")
    missing = [k for k in ("arch", "widths", "state_dict") if k not in obj]
    arch = obj.get("arch")
    if missing or not (arch is None or isinstance(arch, dict) and {"name", "num_classes", "in_channels"} <= arch.keys()):
        raise ValueError(f"{path}: a damaged greg_fast model file (missing {missing or ['arch fields']})")
    if model is None:
        if arch is None:
            raise ValueError(f"{path} holds a {obj.get('model_class', 'custom')} model, which greg_fast cannot "
                             f"build by itself: pass a fresh instance, load(path, model={obj.get('model_class', 'MyNet')}(...))")
        model = models.create(arch["name"], arch["num_classes"], in_channels=arch["in_channels"])
    model = rebuild(unwrap(model), obj["state_dict"], obj["widths"], obj.get("counts") or {}, obj.get("stored") or {},
                    path)
    model.greg_masks = obj["masks"]
    if obj.get("input_size"):  # the input it was planned and trained on
        model.greg_input_size = tuple(obj["input_size"])
    return model.to(map_location)


def rebuild(model: nn.Module, state: Mapping[str, torch.Tensor], widths: Mapping[str, list[int]],
            counts: Mapping[str, list], stored: Mapping[str, Mapping], path) -> nn.Module:
    """Shrink a freshly built ``model`` to a compacted one's ``widths`` (and its other tensors to
    ``state``'s shapes), give it the ``counts`` its exact ops keep and the ``stored`` widths its
    modules read, and load ``state``. Raises ``ValueError`` naming ``path`` where they do not fit."""
    resize(model, widths)
    _resize_others(model, state)
    _keep_counts(model, counts, path)
    _set_stored(model, stored, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the described architecture: {err}") from err
    return model


def _keep_counts(model: nn.Module, saved: Mapping[str, list], path) -> None:
    """The ops of a compacted model that compute with the masked model's widths (:mod:`greg_fast.exact`)."""
    modules = dict(model.named_modules())
    for name, records in saved.items():
        if name not in modules or not all(isinstance(r, (list, tuple)) and len(r) == 4 and r[0] in OPS for r in records):
            raise ValueError(f"{path}: the saved model keeps the widths of {name!r}, which this "
                             f"{type(model).__name__} does not have: pass an instance of the saved model class")
        keep_counts(modules[name], [Count(str(op), int(axis), int(kept), int(width)) for op, axis, kept, width in records])


def _set_stored(model: nn.Module, saved: Mapping[str, Mapping], path) -> None:
    """The widths a compacted model's modules read from their attributes (``num_heads``, ``shape``)."""
    modules = dict(model.named_modules())
    for name, values in saved.items():
        m = modules.get(name)
        if m is None or not all(hasattr(m, k) for k in values):
            raise ValueError(f"{path}: the saved model sets {sorted(values)} of {name!r}, which this "
                             f"{type(model).__name__} does not have: pass an instance of the saved model class")
        for k, v in values.items():
            old = getattr(m, k)
            set_attribute(m, k, type(old)(v) if isinstance(old, (tuple, list)) else v)


@torch.no_grad()
def _resize_others(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Other tensors a coupled group cut (a layer scale, a LayerNorm): take the saved shape, to be
    loaded into."""
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES + NORM_TYPES):
            continue
        for table in (m._parameters, m._buffers):
            for attr, t in table.items():
                saved = state.get(f"{name}.{attr}" if name else attr)
                if t is not None and isinstance(saved, torch.Tensor) and saved.shape != t.shape:
                    new = t.new_empty(saved.shape)
                    table[attr] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                    set_widths(m)


@torch.no_grad()
def resize(model: nn.Module, shapes: Mapping[str, list[int]]) -> None:
    """Give every listed Conv/Linear/BatchNorm fresh (uninitialized) tensors of the listed width."""
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        m = modules.get(name)
        if not isinstance(m, LAYER_TYPES + NORM_TYPES):
            raise ValueError(f"the saved architecture has {name!r}, which is not a Conv/Linear/BatchNorm of "
                             f"this {type(model).__name__}: pass an instance of the saved model class")
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
        set_widths(m)
