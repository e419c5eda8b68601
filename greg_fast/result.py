"""The result of :func:`greg_fast.plan`: the units to regularize, the layers left out and why, and
what removing the planned groups costs and saves."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn as nn

from .capture import unwrap
from .table import format_table
from .ties import expand, find_ties
from .units import LayerPlan


class Plan:
    """The result of :func:`plan`: ``layers`` (regularized, in execution order) and ``excluded``
    (``{name: reason}``); ``print(plan)`` shows the table with parameter and FLOP totals."""

    def __init__(self, model: nn.Module, layers: list[LayerPlan], excluded: dict[str, str],
                 layer_flops: dict[tuple[str, str], int], total_flops: int, example_inputs: tuple = ()):
        self.model_class = type(model).__name__
        self.example_inputs = example_inputs  # what compact(verify=True) runs through the model
        self.layers = layers
        self.excluded = excluded
        self._layer_flops = layer_flops
        self.total_flops = total_flops
        self.total_params = sum(p.numel() for p in model.parameters())
        self._modules = dict(model.named_modules())
        self._shapes = {l.name: tuple(l.weight.shape) for l in layers}
        self.ties = find_ties(layers)[0]  # units whose counts follow another's (greg_fast.ties)
        self._cost = self._compute_cost()  # of the model as planned, whatever happens to it later
        self.compacted = False  # set by compact(): the plan then describes the model as it was
        self.budget = None      # a target's allocation rules (greg_fast.budget.Budget), if planned to one

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

    def check_model(self, model: nn.Module) -> None:
        """Raise unless the planned layers are modules of ``model`` (not of a copy or another model)
        and the model has not been compacted since."""
        self.check_current()
        model = unwrap(model)
        for layer in self.layers:
            try:
                found = model.get_submodule(layer.name.split("#")[0])
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

    def cost(self) -> dict[str, int]:
        """Parameters and FLOPs (``torch.utils.flop_counter``, one example input) before and after
        removing the planned groups (of the model as planned). A layer's FLOPs shrink with its
        weight's kept entries (rows times columns)."""
        return dict(self._cost)

    def _compute_cost(self) -> dict[str, int]:
        removed_params, removed_flops = self._removed(self.pruned)
        return {"params_before": self.total_params,
                "params_after": self.total_params - round(removed_params),
                "flops_before": self.total_flops,
                "flops_after": self.total_flops - round(removed_flops)}

    def set_counts(self, counts: Mapping[str, int]) -> None:
        """Give the named units new counts of removed groups (an allocation); costs follow, and so do
        the units tied to them (raises where ``counts`` breaks a tie)."""
        self.check_current()
        counts = expand(self.ties, counts)
        for l in self.layers:
            if l.name in counts:
                l.n_prune = int(counts[l.name])
                l.ratio = l.n_prune / l.n_groups
        self._cost = self._compute_cost()

    def kept_fraction(self, counts: Mapping[str, int]) -> dict[str, float]:
        """The fractions of the model's FLOPs and parameters kept if the units lose ``counts``
        groups (the others none)."""
        params, flops = self._removed(self.layers, expand(self.ties, counts))
        return {"flops": 1 - flops / max(self.total_flops, 1), "params": 1 - params / max(self.total_params, 1)}

    def _removed(self, units: Sequence[LayerPlan], counts: Mapping[str, int] | None = None) -> tuple[float, float]:
        """Parameters and FLOPs that removing ``units``' planned groups (or ``counts`` of them)
        takes away."""
        removed: dict[tuple[str, str, int], int] = {}  # positions removed per tensor axis
        kept: dict[tuple[str, str], float] = {}        # kept fraction per tensor
        for l in units:
            n_prune = l.n_prune if counts is None else counts.get(l.name, 0)
            if not n_prune:
                continue
            if l.granularity == "weight":
                kept[(l.name, "weight")] = (l.n_groups - n_prune) / l.n_groups
            for key, positions in l.members.items():
                if key.tensor:
                    at = (key.module, key.tensor, key.axis)
                    removed[at] = removed.get(at, 0) + n_prune * positions.shape[1]
        for (module, tensor, axis), n in removed.items():
            size = getattr(self._modules[module], tensor).shape[axis]
            kept[(module, tensor)] = kept.get((module, tensor), 1.0) * (1 - n / size)
        params = flops = 0.0
        for (module, tensor), fraction in kept.items():
            t = getattr(self._modules[module], tensor)
            if isinstance(t, nn.Parameter):
                params += t.numel() * (1 - fraction)
            flops += self._layer_flops.get((module, tensor), 0) * (1 - fraction)
        return params, flops

    def __repr__(self) -> str:
        if any(l.coupled for l in self.layers):
            rows = [("group", "channels", "pruned", "ratio", "FLOPs -%", "members")]
            for l in self.layers:  # FLOPs -%: of the model's, by this group's cut alone
                names = list(dict.fromkeys(k.module for k in l.members))
                shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
                share = 100 * self._removed([l])[1] / max(self.total_flops, 1)
                rows.append((l.name, str(l.n_groups), str(l.n_prune), f"{l.ratio:.3g}", f"{share:.1f}", shown))
            right = (1, 2, 3, 4)
        else:
            rows = [("layer", "granularity", "shape", "groups", "pruned", "ratio")]
            for l in self.layers:
                rows.append((l.name, l.granularity, "x".join(map(str, self._shapes[l.name])), str(l.n_groups),
                             str(l.n_prune), f"{l.ratio:.3g}"))
            right = (3, 4, 5)
        unit = "groups" if any(l.coupled for l in self.layers) else "layers"
        lines = [f"Plan for {self.model_class}: {len(self.pruned)} of {len(self.layers)} {unit} pruned, "
                 f"{len(self.excluded)} excluded"]
        if self.compacted:
            lines.append("(the model has been compacted since: shapes and costs are those it had when planned)")
        lines.append(format_table(rows, right=right))
        c = self.cost()
        lines.append(f"parameters: {c['params_before']:,} -> {c['params_after']:,} "
                     f"({c['params_before'] / max(c['params_after'], 1):.2f}x fewer)")
        lines.append(f"FLOPs:      {c['flops_before']:,} -> {c['flops_after']:,} "
                     f"({c['flops_before'] / max(c['flops_after'], 1):.2f}x fewer)")
        if self.budget is not None:
            lines.append(self.budget.describe())
        approximate = [l.name for l in self.layers if l.approximate]
        if approximate:
            lines.append(f"approximate (compacted != masked; measure with output_change): {', '.join(approximate)}")
        if self.excluded:
            lines.append("excluded:")
            lines += [f"  {name}: {reason}" for name, reason in self.excluded.items()]
        return "\n".join(lines)
