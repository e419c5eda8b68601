"""The vocabulary every layer of greg_fast shares: what a unit of pruning is (:class:`LayerPlan`),
which tensor axes it cuts (:class:`MemberKey`), how the backends see a coupled group (:class:`Slice`)
and how many groups a ratio removes (:func:`n_prune_for`). It imports nothing of greg_fast."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

GRANULARITIES = ("filter", "channel", "weight")
PENALIZE = ("filters", "group")
HEADS = ("dims", "whole")  # attention: every head loses the same dims (the default), or whole heads go


@dataclass(frozen=True)
class MemberKey:
    """One axis of one tensor of one module: ``module.<tensor>`` along ``axis`` (``tensor`` is empty
    for a norm that holds none: only its width follows)."""
    module: str
    tensor: str
    axis: int
    role: str     # "filter" (conv/linear rows), "bias", "norm", "input" (a consumer's columns), "param",
                  # "count" (no tensor: op ``op`` of the module reads ``width`` entries along ``axis``)
    masked: bool  # zeroed at a removed channel so that the channel is exactly zero downstream
    op: str = ""    # "count" only: the op whose width compaction keeps (greg_fast.exact.OPS)
    width: int = 0  # "count" only: the width the op reads in the masked model


@dataclass(eq=False)
class LayerPlan:
    """One regularized unit: a layer, or with ``coupled`` a channel group of several tensors.

    A layer's weight is viewed as ``[outer, n_groups, inner]``: a group is one index of the middle
    axis (filter: ``[1, N, C*k]``; channel: ``[N, C, k]``; weight: ``[1, numel, 1]``). ``members``
    maps every tensor axis that loses entries with a group to the positions of each group there,
    int64 ``[n_groups, k]`` (structured plans; masks, compaction and cost read only these). A coupled
    group's ``module`` and ``weight`` are its first producer's; what it regularizes is
    :meth:`slices`.
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
    members: dict[MemberKey, torch.Tensor] = field(default_factory=dict)
    coupled: bool = False
    approximate: str | None = None  # why cutting it changes what the model computes (approximate plans)
    tensor: str = "weight"  # its weight's name in the module (nn.MultiheadAttention: "in_proj_weight")
    _slices: dict = field(default_factory=dict, repr=False)

    @property
    def weight(self) -> torch.Tensor:
        # read every step: a dict lookup, not Module.__getattr__; always the module's current weight
        return self.module._parameters[self.tensor]

    @property
    def grad(self) -> torch.Tensor | None:
        return self.module._parameters[self.tensor].grad

    param = weight  # the parameter a backend's slice belongs to (a layer is its own slice)

    def part(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A tensor shaped like the parameter (its momentum buffer), as this slice sees it: whole."""
        return t

    def slices(self, module_of: Callable[[str], nn.Module], penalize: str = "filters") -> list:
        """What growing regularization penalizes and scores: the layer itself, or for a coupled
        group runs of rows/columns of its parameters (:class:`Slice`): its producers' filter rows
        (``penalize="filters"``), or every parameter entry it removes (``"group"``: consumers'
        columns, biases, BatchNorm weight and bias, layer scales too; a single layer's filters
        too: its bias, its BatchNorm's channels and its consumers' columns)."""
        if not self.coupled and (penalize == "filters" or self.granularity != "filter"):
            return [self]
        if penalize not in self._slices:
            self._slices[penalize] = _group_slices(self, module_of, penalize)
        return self._slices[penalize]


@dataclass(eq=False)
class Slice:
    """Consecutive rows (``axis`` 0) or columns (1) of one parameter of a coupled group, seen by the
    backends as a layer: ``weight`` and ``grad`` are those entries viewed as ``[outer, n_groups,
    inner]``; ``channels`` gives the group channel of each row or column."""
    name: str
    module: nn.Module
    tensor: str
    axis: int
    start: int
    n_groups: int
    channels: torch.Tensor
    view: tuple[int, int, int]
    granularity: str  # "filter" for rows, "channel" for columns: how the kernels tile it

    @property
    def param(self) -> torch.Tensor:
        return self.module._parameters[self.tensor]

    def part(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This slice's entries of ``t``, a tensor shaped like the parameter (itself, its gradient,
        its momentum buffer)."""
        if t is None or (self.start == 0 and self.n_groups == t.shape[self.axis]):
            return t
        return t.narrow(self.axis, self.start, self.n_groups)

    @property
    def weight(self) -> torch.Tensor:
        return self.part(self.param)

    @property
    def grad(self) -> torch.Tensor | None:
        return self.part(self.param.grad)


def runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> maximal ``[start, end)`` runs of consecutive ones."""
    out = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def _group_slices(group: LayerPlan, module_of: Callable[[str], nn.Module], penalize: str) -> list[Slice]:
    if penalize not in PENALIZE:
        raise ValueError(f"penalize must be one of {PENALIZE}, got {penalize!r}")
    out = []
    for key, positions in group.members.items():
        module = module_of(key.module)
        p = module._parameters.get(key.tensor) if key.tensor else None
        if p is None or (key.role != "filter" if penalize == "filters" else key.axis > 1):
            continue
        channel_of = torch.full((p.shape[key.axis],), -1, dtype=torch.int64)
        channel_of[positions] = torch.arange(positions.shape[0]).view(-1, 1).expand_as(positions)
        for a, b in runs((channel_of >= 0).nonzero().view(-1).tolist()):
            outer = 1 if key.axis == 0 else p.shape[0]
            inner = p[0].numel() if key.axis == 0 and p.dim() > 1 else (
                math.prod(p.shape[2:]) if key.axis == 1 else 1)
            whole = a == 0 and b == p.shape[key.axis]
            where = "" if whole else f"[{'' if key.axis == 0 else ':, '}{a}:{b}]"
            out.append(Slice(f"{key.module}.{key.tensor}{where}", module,
                             key.tensor, key.axis, a, b - a, channel_of[a:b].clone(), (outer, b - a, inner),
                             "filter" if key.axis == 0 else "channel"))
    return out


def n_prune_for(ratio: float, n_groups: int) -> int:
    """``min(ceil(ratio * n_groups), n_groups - 1)``: never a whole layer. The tolerance keeps
    float products such as 0.55 * 100 = 55.000000000000007 from rounding up to 56."""
    return max(0, min(math.ceil(ratio * n_groups - 1e-9), n_groups - 1))
