"""Single layers (``plan(..., coupled=False)``, the 2021 reference's rule): a layer is one when its
filters are a group that no op joins to other channels and that only its norms and its consumers'
whole input columns go with."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..capture import LAYER_TYPES
from .walk import Group, collect_groups, unfiltered, walk_model


@dataclass
class Consumer:
    """A layer that reads a producer's channels as its input channels."""
    name: str
    spatial: int  # input features per producer channel (>1 only for flatten-before-linear)


@dataclass
class LayerDeps:
    name: str
    module: nn.Module
    consumers: list[Consumer] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)     # the norms carrying this layer's filters
    filter_reason: str | None = None                    # why its filters cannot be cut alone
    producer: str | None = None                         # the layer whose filters are its input channels
    input_spatial: int = 1                              # features per input channel (flatten-before-linear)
    channel_reason: str | None = None                   # why its input channels cannot be cut


_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "")


def _grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1


def _alone(name: str, group: Group | None, modules: dict, shared: dict) -> str | None:
    """Why the filters of layer ``name`` are not a group of their own that only its norms and its
    consumers' columns go with, in the way the single-layer plan cuts them (None: they are)."""
    m = modules[name]
    if group is None:
        return unfiltered(name, shared)
    if _grouped(m):
        return f"grouped/depthwise conv (groups={m.groups}): its filters go with its input channels"
    if group.reason or group.approximate or group.speculative:
        return group.reason or group.approximate or group.speculative
    if group.coupled_by:
        return f"its channels are tied to other channels by {group.coupled_by}; coupled groups cut them together"
    rows = torch.arange(m.weight.shape[0]).view(-1, 1)
    for key, pos in group.members.items():
        same = pos.shape == rows.shape and torch.equal(pos, rows)
        if key.role in ("filter", "bias") and key.module == name and same:
            continue
        if key.role == "norm" and key.tensor in _NORM_TENSORS and same:
            continue
        if key.role == "input" and key.tensor == "weight" and key.axis == 1 and pos.shape[0] == len(rows):
            if modules[key.module].weight.shape[1] != pos.numel():
                return f"`{key.module}` reads its channels beside others (a concat)"
            if not torch.equal(pos, torch.arange(pos.numel()).view(pos.shape)):
                return f"`{key.module}` reads its channels interleaved with another axis, not one block per channel"
            continue
        return f"its channels also reach `{key.module}.{key.tensor}`; coupled groups cut them together"
    return None


def analyze_layers(model: nn.Module, example_inputs: tuple) -> tuple[dict[str, LayerDeps], list[str]]:
    """Every conv/linear layer that runs, in the order it runs, with what a cut of its filters takes
    along when they couple nothing (``filter_reason`` None) and which layer's filters its input
    channels are (``producer``, when that layer's filters feed it alone)."""
    analysis = walk_model(model, example_inputs)
    modules = dict(model.named_modules())
    order = [n for n in analysis.layers if isinstance(modules.get(n), LAYER_TYPES)]
    groups = collect_groups(analysis)
    of_filters = {k.module: g for g in groups for k in g.members if k.role == "filter" and k.tensor == "weight"}
    read_by: dict[str, list[Group]] = {}  # layer -> the groups its input columns belong to
    for g in groups:
        for m in dict.fromkeys(k.module for k in g.members if k.role == "input"):
            read_by.setdefault(m, []).append(g)
    deps = {}
    for name in order:
        d = deps[name] = LayerDeps(name, modules[name])
        g = of_filters.get(name)
        d.filter_reason = _alone(name, g, modules, analysis.shared)
        if d.filter_reason is None:
            d.norms = list(dict.fromkeys(k.module for k in g.members if k.role == "norm"))
            d.consumers = [Consumer(k.module, pos.shape[1]) for k, pos in g.members.items() if k.role == "input"]
    for name in order:
        d, m = deps[name], modules[name]
        sources = read_by.get(name, [])
        if _grouped(m):
            d.channel_reason = f"grouped/depthwise conv (groups={m.groups})"
        elif not sources:
            d.channel_reason = "its input channels come from the model input or from ops without filters to cut"
        elif len(sources) > 1:
            d.channel_reason = "its input channels come from several layers (a concat)"
        else:
            producer = next((k.module for k in sources[0].members if k.role == "filter"), None)
            p = deps.get(producer)
            if p is None:
                d.channel_reason = f"its input channels are group {sources[0].name!r}, which has no layer's filters"
            elif p.filter_reason is not None:
                d.channel_reason = f"its producer '{producer}' cannot be cut: {p.filter_reason}"
            elif [c.name for c in p.consumers] != [name]:
                d.channel_reason = f"its producer '{producer}' also feeds " + ", ".join(
                    repr(c.name) for c in p.consumers if c.name != name)
            else:
                d.producer, d.input_spatial = producer, p.consumers[0].spatial
    return deps, order
