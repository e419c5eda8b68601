"""Which layers are pruned, by how much, and what removing their groups costs and saves."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .graph import LAYER_TYPES, LayerDeps, analyze, unwrap
from .table import format_table

GRANULARITIES = ("filter", "channel", "weight")


@dataclass
class LayerPlan:
    """One regularized layer. Its weight is viewed as ``[outer, n_groups, inner]``: a group is one
    index of the middle axis (filter: ``[1, N, C*k]``; channel: ``[N, C, k]``; weight: ``[1, numel, 1]``).
    """
    name: str
    module: nn.Module
    granularity: str
    n_groups: int
    n_prune: int
    ratio: float
    view: tuple[int, int, int]
    norms: list[str] = field(default_factory=list)      # BatchNorms cut with the filters
    consumers: list[str] = field(default_factory=list)  # layers whose input channels are cut with them
    producer: str | None = None                          # channel granularity: whose filters are cut too

    @property
    def weight(self) -> torch.Tensor:
        # read every step: a dict lookup, not Module.__getattr__; always the module's current weight
        return self.module._parameters["weight"]


def n_prune_for(ratio: float, n_groups: int) -> int:
    """``min(ceil(ratio * n_groups), n_groups - 1)``: never a whole layer. The tolerance keeps
    float products such as 0.55 * 100 = 55.000000000000007 from rounding up to 56."""
    return max(0, min(math.ceil(ratio * n_groups - 1e-9), n_groups - 1))


def _check_ratio(ratio: float, what: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"{what}: ratio must be a number in [0, 1), got {ratio!r}")
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{what}: ratio must be in [0, 1), got {ratio}")
    return ratio


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _group_view(module: nn.Module, granularity: str, input_spatial: int) -> tuple[int, int, int]:
    w = module.weight
    if granularity == "filter":
        return (1, w.shape[0], w[0].numel())
    if granularity == "channel":
        channels = w.shape[1] // input_spatial
        return (w.shape[0], channels, w[0].numel() // channels)
    return (1, w.numel(), 1)


class Plan:
    """The result of :func:`plan`: ``layers`` (regularized, in execution order) and ``excluded``
    (``{name: reason}``); ``print(plan)`` shows the table with parameter and FLOP totals."""

    def __init__(self, model: nn.Module, layers: list[LayerPlan], excluded: dict[str, str],
                 deps: dict[str, LayerDeps], layer_flops: dict[str, int], total_flops: int):
        self.model_class = type(model).__name__
        self.layers = layers
        self.excluded = excluded
        self._deps = deps
        self._layer_flops = layer_flops
        self.total_flops = total_flops
        self.total_params = sum(p.numel() for p in model.parameters())
        self._modules = dict(model.named_modules())
        self._shapes = {l.name: tuple(l.weight.shape) for l in layers}
        self._cost = self._compute_cost()  # of the model as planned, whatever happens to it later
        self.compacted = False  # set by compact(): the plan then describes the model as it was

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def norms_of(self, name: str) -> list[str]:
        """The BatchNorms that carry layer ``name``'s filters (cut with them)."""
        return list(self._deps[name].norms)

    def check_model(self, model: nn.Module) -> None:
        """Raise unless the planned layers are modules of ``model`` (not of a copy or another model)
        and the model has not been compacted since."""
        self.check_current()
        model = unwrap(model)
        for layer in self.layers:
            try:
                found = model.get_submodule(layer.name)
            except AttributeError:
                found = None
            if found is not layer.module:
                raise ValueError(f"the plan was built for another model: layer {layer.name!r} of the "
                                 f"plan ({self.model_class}) is not a module of this "
                                 f"{type(model).__name__}; build the plan from this model")

    def check_current(self) -> None:
        if self.compacted:
            raise ValueError("this plan describes the model before compaction (its groups are gone): "
                             "build a new plan from the compacted model")

    @property
    def pruned(self) -> list[LayerPlan]:
        """Layers that lose at least one group."""
        return [l for l in self.layers if l.n_prune > 0]

    def _kept_fractions(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """Per layer: kept fraction of filters, of input channels, of individual weights."""
        out, inp, dense = {}, {}, {}
        for l in self.pruned:
            kept = (l.n_groups - l.n_prune) / l.n_groups
            if l.granularity == "weight":
                dense[l.name] = kept
                continue
            producer = l.name if l.granularity == "filter" else l.producer
            consumers = l.consumers if l.granularity == "filter" else [l.name]
            out[producer] = kept
            for c in consumers:
                inp[c] = kept
        return out, inp, dense

    def cost(self) -> dict[str, int]:
        """Parameters and FLOPs (``torch.utils.flop_counter``, one example input) before and after
        removing the planned groups, assuming removal of everything they feed exclusively (of the
        model as planned)."""
        return dict(self._cost)

    def _compute_cost(self) -> dict[str, int]:
        out, inp, dense = self._kept_fractions()
        removed_params = removed_flops = 0.0
        for name, d in self._deps.items():
            m = d.module
            keep = dense.get(name, out.get(name, 1.0) * inp.get(name, 1.0))
            removed_params += m.weight.numel() * (1 - keep)
            removed_flops += self._layer_flops.get(name, 0) * (1 - keep)
            if m.bias is not None:
                removed_params += m.bias.numel() * (1 - out.get(name, 1.0))
            for norm in d.norms:
                bn = self._modules[norm]
                if bn.affine:
                    removed_params += 2 * bn.num_features * (1 - out.get(name, 1.0))
        return {"params_before": self.total_params,
                "params_after": self.total_params - round(removed_params),
                "flops_before": self.total_flops,
                "flops_after": self.total_flops - round(removed_flops)}

    def __repr__(self) -> str:
        rows = [("layer", "granularity", "shape", "groups", "pruned", "ratio")]
        for l in self.layers:
            rows.append((l.name, l.granularity, "x".join(map(str, self._shapes[l.name])), str(l.n_groups),
                         str(l.n_prune), f"{l.ratio:.3g}"))
        lines = [f"Plan for {self.model_class}: {len(self.pruned)} of {len(self.layers)} layers pruned, "
                 f"{len(self.excluded)} excluded"]
        if self.compacted:
            lines.append("(the model has been compacted since: shapes and costs are those it had when planned)")
        lines.append(format_table(rows, right=(3, 4, 5)))
        c = self.cost()
        lines.append(f"parameters: {c['params_before']:,} -> {c['params_after']:,} "
                     f"({c['params_before'] / max(c['params_after'], 1):.2f}x fewer)")
        lines.append(f"FLOPs:      {c['flops_before']:,} -> {c['flops_after']:,} "
                     f"({c['flops_before'] / max(c['flops_after'], 1):.2f}x fewer)")
        if self.excluded:
            lines.append("excluded:")
            lines += [f"  {name}: {reason}" for name, reason in self.excluded.items()]
        return "\n".join(lines)


def _default_inputs(model: nn.Module) -> tuple:
    size = getattr(model, "greg_input_size", None)
    if size is None:
        first = next((m for m in model.modules() if isinstance(m, LAYER_TYPES)), None)
        if isinstance(first, nn.Linear):
            size = (first.in_features,)
        elif first is not None:
            size = (first.in_channels,) + (32,) * (first.weight.dim() - 2)
        else:
            raise ValueError("the model has no Conv or Linear layer to prune")
    p = next(model.parameters())
    return (torch.zeros(1, *size, device=p.device, dtype=p.dtype),)


def count_flops(model: nn.Module, example_inputs: tuple) -> tuple[dict[str, int], int]:
    """FLOPs of one eval-mode forward (``torch.utils.flop_counter``): per module name, and in all."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*example_inputs)
    finally:
        model.train(was_training)
    prefix = type(model).__name__ + "."
    per_module = {k[len(prefix):]: sum(v.values()) for k, v in counter.get_flop_counts().items()
                  if k.startswith(prefix)}
    return per_module, counter.get_total_flops()


def plan(model: nn.Module, ratio: float = 0.0, *, granularity: str = "filter",
         ratios: Mapping[str, float] | None = None, skip: Sequence[str] = (),
         example_inputs: tuple | torch.Tensor | None = None) -> Plan:
    """Decide which layers of ``model`` are regularized and how many groups each loses.

    Prunability comes from the traced graph (see :mod:`greg_fast.graph`). ``ratio`` applies to
    every prunable layer; ``ratios`` maps layer names or glob patterns to ratios that override it
    (the last matching key wins; see :func:`stage_ratios` for the reference's ResNet stage lists);
    ``skip`` excludes names or globs. A layer prunes ``min(ceil(r * n_groups), n_groups - 1)`` groups.
    A ``torch.compile``, DataParallel or DistributedDataParallel wrapper is planned through to the
    module it runs. Layers whose weight is frozen (``requires_grad=False``) are excluded: they
    would lose groups without ever being regularized.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan() needs an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    ratio = _check_ratio(ratio, "ratio")
    if ratios is not None and not isinstance(ratios, Mapping):
        raise TypeError(f"ratios must map layer names or globs to ratios, e.g. {{'layer1.*': 0.5}}; "
                        f"got {type(ratios).__name__}")
    ratios = {k: _check_ratio(v, f"ratios[{k!r}]") for k, v in (ratios or {}).items()}
    if isinstance(skip, str):
        skip = (skip,)
    if example_inputs is None:
        example_inputs = _default_inputs(model)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not all(
            isinstance(x, torch.Tensor) for x in example_inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (the model's arguments), "
                        f"got {type(example_inputs).__name__}")

    deps, order = analyze(model, tuple(example_inputs))
    all_names = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    for key in ratios:
        if not any(_matches(n, key) for n in all_names):
            raise ValueError(f"ratios key {key!r} matches no Conv/Linear layer of {type(model).__name__}")
    for pattern in skip:
        if not any(_matches(n, pattern) for n in dict(model.named_modules())):
            raise ValueError(f"skip entry {pattern!r} matches no module of {type(model).__name__}")

    layers, excluded = [], {}
    for index, name in enumerate(order):
        d = deps[name]
        if any(_matches(name, p) for p in skip):
            excluded[name] = "skipped by the user"
            continue
        if granularity == "filter":
            reason = d.filter_reason
        elif granularity == "channel":
            reason = d.channel_reason
        else:
            reason = "first layer: the reference never prunes the stem" if index == 0 else None
        if reason is None and not d.module.weight.requires_grad:
            reason = "its weight is frozen (requires_grad=False): it would lose groups without being regularized"
        if reason is not None:
            excluded[name] = reason
            continue
        r = ratio
        for key, value in ratios.items():
            if _matches(name, key):
                r = value
        view = _group_view(d.module, granularity, d.input_spatial)
        layers.append(LayerPlan(
            name=name, module=d.module, granularity=granularity, n_groups=view[1],
            n_prune=n_prune_for(r, view[1]), ratio=r, view=view,
            norms=list(d.norms) if granularity == "filter" else [],
            consumers=[c.name for c in d.consumers] if granularity == "filter" else [],
            producer=d.producer if granularity == "channel" else None))
    layer_flops, total = count_flops(model, tuple(example_inputs))
    return Plan(model, layers, excluded, deps, layer_flops, total)


def stage_ratios(model: nn.Module, stages: Sequence[float]) -> dict[str, float]:
    """Turn the reference's ResNet stage list ``[stem, stage1, ..., stageK, fc]`` into ``ratios``.

    ``stage_ratios(resnet56, [0, 0.75, 0.75, 0.32, 0])`` gives
    ``{"conv1": 0, "layer1.*": 0.75, "layer2.*": 0.75, "layer3.*": 0.32, "fc": 0}``.
    """
    names = dict(model.named_children())
    n_stages = sum(1 for n in names if n.startswith("layer") and n[5:].isdigit())
    if n_stages == 0 or "conv1" not in names or "fc" not in names:
        raise ValueError(f"stage lists need a ResNet with conv1, layer1..layerK and fc; "
                         f"{type(model).__name__} has {list(names)}")
    if len(stages) != n_stages + 2:
        raise ValueError(f"{type(model).__name__} has {n_stages} stages: the list needs "
                         f"{n_stages + 2} ratios [stem, stage1..stage{n_stages}, fc], got {len(stages)}")
    keys = ["conv1", *(f"layer{i}.*" for i in range(1, n_stages + 1)), "fc"]
    return dict(zip(keys, map(float, stages)))
