"""What the backends see of a plan's units: the penalized slices, each with its unit's mask and λ.

A layer penalized by its filters alone is its own slice, so a plan of such layers passes through
untouched (no copy, no gather per step). A coupled group, or a layer penalized with everything its
cut removes, is regularized through runs of rows or columns of several parameters
(:meth:`greg_fast.units.LayerPlan.slices`); each slice reads its unit's kept mask through its
channel index (gathered again only when a selection changed it) and its unit's two λ values.
A unit's score per channel is the mean |w| over all its slices' entries of that channel, summed in
a fixed order (one gather and one sum: the same picks every run). With ``whole`` (the fused SGD
step, which updates parameters, not penalties), rows of a penalized parameter that no unit owns
(a group excluded beside a pruned one) become filler slices with λ = 0 and nothing removed.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .backend import eager
from .units import LayerPlan, Slice, runs


class SliceMap:
    """The slices of ``units`` for one ``penalize`` mode, and the maps between slices and units."""

    def __init__(self, units: Sequence[LayerPlan], module_of: Callable[[str], nn.Module], penalize: str,
                 device: torch.device, whole: bool = False, cache: bool = True):
        self.units = list(units)
        # cache: reuse the per-slice masks, λ and cross tables while the host's version says they
        # hold; off for a capturable schedule, whose masks and λ change on the device
        self.cache = cache
        per_unit = [u.slices(module_of, penalize) for u in self.units]
        self.slices = [s for slices in per_unit for s in slices]
        self.identity = all(s == [u] for u, s in zip(self.units, per_unit))  # every unit its own slice
        self._version = None
        self._kept: list[torch.Tensor] = []
        self._per_slice: dict[int, tuple] = {}
        self.passes: tuple[int, ...] = ()
        if self.identity:
            return
        unit_of = [i for i, slices in enumerate(per_unit) for _ in slices]
        self.fillers = _fillers(self.slices) if whole else []
        self.slices += self.fillers
        unit_of += [len(self.units)] * len(self.fillers)  # a unit of its own: λ 0, all kept
        # a parameter's rows and its columns share entries: rows run first, columns in a second pass
        rows = {id(s.param) for s in self.slices if s.axis == 0}
        if any(s.axis == 1 and id(s.param) in rows for s in self.slices):
            order = sorted(range(len(self.slices)), key=lambda i: self.slices[i].axis)
            self.slices = [self.slices[i] for i in order]
            unit_of = [unit_of[i] for i in order]
            n_rows = sum(1 for s in self.slices if s.axis == 0)
            self.passes = (n_rows, len(self.slices) - n_rows)
            self._cross_setup(device)
        self._unit_of = unit_of  # on the host too: the kept gather needs no device sync
        self.unit_index = torch.tensor(unit_of, dtype=torch.int64, device=device)
        self.channels = [s.channels.to(device) for s in self.slices]
        # per unit: where each channel's entries are in the flat per-slice score buffer, and their count
        self.gather, self.counts = [], []
        offset = 0
        starts = []
        for s in self.slices:
            starts.append(offset)
            offset += s.n_groups
        self._starts, self._total = starts, offset
        for i, unit in enumerate(self.units):
            where: list[list[int]] = [[] for _ in range(unit.n_groups)]
            entries = torch.zeros(unit.n_groups, dtype=torch.float64)
            for j in (j for j, u in enumerate(unit_of) if u == i):
                s = self.slices[j]
                per_entry = s.view[0] * s.view[2]
                for pos, c in enumerate(s.channels.tolist()):
                    where[c].append(starts[j] + pos)
                entries.index_add_(0, s.channels, torch.full((s.n_groups,), float(per_entry), dtype=torch.float64))
            if len({len(w) for w in where}) != 1:
                raise ValueError(f"group {unit.name!r} has channels with different numbers of regularized slices")
            self.gather.append(torch.tensor(where, dtype=torch.int64, device=device))
            self.counts.append(entries.to(device=device, dtype=torch.float32))

    def kept(self, unit_kept: Sequence[torch.Tensor], version: int) -> list[torch.Tensor]:
        """Each slice's kept mask (the unit's, through the slice's channel index)."""
        if self.identity:
            return list(unit_kept)
        if not self.cache:
            return self._kept_in_place(unit_kept)
        if version != self._version:
            self._kept = self.by_channel(unit_kept, filler=True)
            self._version = version
        return self._kept

    def _kept_in_place(self, unit_kept: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`kept` for a capturable schedule, whose masks change on the device: gathered anew
        every step, into buffers that stay where they are (a cached launch bakes in their addresses,
        a captured graph writes them), with two small kernels rather than one per slice."""
        if not self._kept:
            sizes = [k.numel() for k in unit_kept]
            starts = list(itertools.accumulate(sizes, initial=0))  # the last: a True for the fillers
            self._gather_src = torch.ones(starts[-1] + 1, dtype=torch.bool, device=self.unit_index.device)
            self._gather_idx = torch.cat([c + starts[u] if u < len(sizes) else torch.full_like(c, starts[-1])
                                          for u, c in zip(self._unit_of, self.channels)])
            self._kept_flat = torch.empty(len(self._gather_idx), dtype=torch.bool, device=self._gather_src.device)
            self._kept = list(self._kept_flat.split([len(c) for c in self.channels]))
        torch.cat(list(unit_kept), out=self._gather_src[:-1])
        torch.index_select(self._gather_src, 0, self._gather_idx, out=self._kept_flat)
        return self._kept

    def by_channel(self, per_unit: Sequence[torch.Tensor], filler) -> list[torch.Tensor]:
        """Per-unit, per-channel values (masks, λ) as each slice sees them; ``filler`` for fillers."""
        if self.identity:
            return list(per_unit)
        n = max((s.n_groups for s in self.fillers), default=0)
        values = list(per_unit) + [per_unit[0].new_full((n,), filler) if per_unit else None]
        return [values[u][c] for u, c in zip(self._unit_of, self.channels)]

    def per_slice(self, per_unit: torch.Tensor) -> torch.Tensor:
        """A per-unit vector (λ) indexed per slice (0 for fillers); gathered again only when λ
        changed (a new tensor or an in-place write), not every step: two launches fewer on a GPU."""
        if self.identity:
            return per_unit
        cached = self._per_slice.get(id(per_unit)) if self.cache else None
        if cached is not None and cached[0] is per_unit and cached[1] == per_unit._version:
            return cached[2]
        out = torch.cat([per_unit, per_unit.new_zeros(1)]).index_select(0, self.unit_index)
        if not self.cache:
            return out
        if len(self._per_slice) >= 4:  # λ kept and λ selected, and the ones they replaced
            self._per_slice.clear()
        self._per_slice[id(per_unit)] = (per_unit, per_unit._version, out)
        return out

    # ---- a parameter's rows and columns in one launch (triton's CROSS kernel) ----
    def _cross_setup(self, device: torch.device) -> None:
        """For parameters with penalized rows and penalized columns: which rows the row slices own
        (the column slices leave those rows' entries to them), and each column slice's place."""
        param_of = [(id(s.module), s.tensor) for s in self.slices]
        rows: dict[tuple, torch.Tensor] = {}
        for s, key in zip(self.slices, param_of):
            if s.axis == 0:
                own = rows.setdefault(key, torch.zeros(s.param.shape[0], dtype=torch.int8))
                own[s.start:s.start + s.n_groups] = 1
        self._cross_cols: dict[tuple, list[int]] = {}  # per such parameter: its column slices
        for j, (s, key) in enumerate(zip(self.slices, param_of)):
            if s.axis == 1 and key in rows:
                self._cross_cols.setdefault(key, []).append(j)
        self._own = [rows[key].to(device) if s.axis == 1 and key in rows else None
                     for s, key in zip(self.slices, param_of)]
        self._param_of = param_of
        self._cross_cache: tuple = ()

    def cross(self, kept: Sequence[torch.Tensor], lam_kept: torch.Tensor, lam_selected: torch.Tensor) -> list | None:
        """Per slice ``(xlam, xkeep, own)`` for one launch over rows and columns that share entries:
        a row slice's λ and kept flag of its parameter's columns at every position of its rows
        (0 and 1 where no column is penalized), a column slice's rows owned by row slices; None
        where not needed, and None for a plan without such parameters. Rebuilt only when the
        masks or λ change: :meth:`kept` and :meth:`per_slice` return new objects exactly then."""
        if not self.passes or not self._cross_cols:
            return None
        key = (kept, lam_kept, lam_selected)
        if self.cache and self._cross_cache and all(a is b for a, b in zip(self._cross_cache[0], key)):
            return self._cross_cache[1]
        along_b = {}
        for param_key, cols in self._cross_cols.items():
            first = self.slices[cols[0]]
            lam = torch.zeros(first.param.shape[1], dtype=torch.float32, device=lam_kept.device)
            keep = torch.ones(first.param.shape[1], dtype=torch.int8, device=lam_kept.device)
            for j in cols:
                s = self.slices[j]
                lam[s.start:s.start + s.n_groups] = torch.where(kept[j], lam_kept[j], lam_selected[j])
                keep[s.start:s.start + s.n_groups] = kept[j].to(torch.int8)
            inner = first.view[2]  # a column's entries per row: the kernel area
            along_b[param_key] = (lam.repeat_interleave(inner), keep.repeat_interleave(inner))
        out = []
        for s, param_key, own in zip(self.slices, self._param_of, self._own):
            x = along_b.get(param_key) if s.axis == 0 else None
            out.append((*(x or (None, None)), own))
        if self.cache:
            self._cross_cache = (key, out)
        return out

    def unit_scores(self, slice_scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-slice mean |w| of every row/column -> per-unit mean |w| of every channel."""
        if self.identity:
            return list(slice_scores)
        flat = torch.cat([s * (sl.view[0] * sl.view[2]) for s, sl in zip(slice_scores, self.slices)])
        return [flat[g].sum(1) / n for g, n in zip(self.gather, self.counts)]


    def unit_scores_of(self, i: int, scores_fn) -> torch.Tensor:
        """Unit ``i``'s scores now, from ``scores_fn`` (a backend's ``scores``) over its slices only."""
        if self.identity:
            return scores_fn([self.units[i]])[0]
        mine = [j for j, u in enumerate(self._unit_of) if u == i]
        flat = torch.zeros(self._total, dtype=torch.float32, device=self.unit_index.device)
        for j, s in zip(mine, scores_fn([self.slices[j] for j in mine])):
            sl = self.slices[j]
            flat[self._starts[j]:self._starts[j] + sl.n_groups] = s * (sl.view[0] * sl.view[2])
        return flat[self.gather[i]].sum(1) / self.counts[i]


def _fillers(slices: Sequence[Slice]) -> list[Slice]:
    """Row runs of the penalized parameters that no slice covers (channel index: 0..n-1)."""
    covered: dict[int, tuple[Slice, torch.Tensor]] = {}
    for s in slices:
        if s.axis == 0:
            rows = covered.setdefault(id(s.param), (s, torch.zeros(s.param.shape[0], dtype=torch.bool)))[1]
            rows[s.start:s.start + s.n_groups] = True
    out = []
    for s, rows in covered.values():
        free = (~rows).nonzero().view(-1).tolist()
        for a, b in runs(free):
            out.append(Slice(f"{s.name.split('[')[0]}[{a}:{b}] (excluded)", s.module, s.tensor, 0, a, b - a,
                             torch.arange(b - a), (1, b - a, s.view[2]), "filter"))
    return out


def plan_scores(plan, units: Sequence[LayerPlan], penalize: str = "filters") -> dict[str, torch.Tensor]:
    """Each unit's group scores (mean |w| of what GrowingReg penalizes) on the weights as they are."""
    device = units[0].weight.device if units else torch.device("cpu")
    m = SliceMap(units, plan.module, penalize, device)
    return dict(zip((u.name for u in units), m.unit_scores(eager.scores(m.slices))))
