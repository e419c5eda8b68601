"""The growing-regularization schedule: phases, λ, selections and magnitude ratios, with its
state_dict. It knows nothing of optimizers or kernels: :class:`greg_fast.GrowingReg` feeds it the
group scores a step produced and applies the λ and masks it holds.

State is tiny and exact. λ takes at most two values per layer, so a layer holds a kept mask over
its groups plus integer counts: ``n_pick`` penalty increments of ``pick_delta`` (GReg-2's uniform
phase, the same for every layer) and ``n_grow[i]`` increments of ``delta``. Then

    λ_selected = n_pick * pick_delta + n_grow * delta
    λ_kept     = 0 (GReg-1) | n_pick * pick_delta until the first post-pick increment, then ``recover`` (GReg-2)

computed in float64 on the parameters' device, so "λ after k updates is k * delta" holds without
accumulated rounding and a resumed run continues bit for bit.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.distributed._functional_collectives as funcol

from .hyper import Hyper
from .masks import keep_strongest, kept_bool, pack_bits
from .units import LayerPlan

PHASES = ("pick", "grow", "stabilize", "done")
_SMOOTHING = 0.9  # h = 0.9 h + 0.1 ratio, as in the reference


def _reached(value: float, threshold: float) -> bool:
    """value >= threshold, forgiving float products (1000 * 1e-5 vs 1e-2)."""
    return value >= threshold * (1 - 1e-9) if threshold > 0 else value >= threshold


def _from_rank0(*tensors: torch.Tensor) -> None:
    """Under torch.distributed, make every rank hold rank 0's decisions (selections, finished
    layers, smoothed ratios): identical by construction, guaranteed regardless of rounding. One
    broadcast for all of them, a functional collective so that a compiled step traces it."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    dtype = torch.uint8 if dtype == torch.bool else dtype  # not every backend sends bool
    wire = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    wire = funcol.broadcast(wire, 0, dist.group.WORLD)
    for t, part in zip(tensors, wire.split([t.numel() for t in tensors])):
        t.copy_(part.view(t.shape))


class Schedule:
    """GReg-1 / GReg-2 / L1 over ``layers`` (the plan's pruned layers). Phases: ``pick`` (GReg-2
    only), ``grow``, ``stabilize``, ``done``. Per step: :meth:`begin_step` (the score-independent
    half of a λ update, when due), the caller's pass over the weights, :meth:`end_step` with its
    scores (picks, magnitude ratios, finishing), then :meth:`advance`."""

    def __init__(self, layers: Sequence[LayerPlan], method: str, hyper: Hyper, device: torch.device,
                 late_allocation: bool = False):
        self.layers, self.method, self.device = list(layers), method, device
        # GReg-2 with a global budget: the caller sets every layer's n_prune from the scores at the
        # pick, before end_step selects; a layer left with none is idle from then on (λ 0, finished)
        self.late_allocation = late_allocation
        self.hyper = hyper.as_dict()
        self.structured = self.layers[0].granularity != "weight" if self.layers else True
        n, dev = len(self.layers), device
        # all kept masks are views of one flat buffer, so that cross-layer reductions are single ops;
        # unstructured layers keep theirs bit-packed: one bit per weight
        sizes = [l.n_groups for l in self.layers]
        if self.structured:
            self.kept_flat = torch.ones(sum(sizes), dtype=torch.bool, device=dev)
            self.kept = list(self.kept_flat.split(sizes))
        else:
            packed = [-(-g // 8) for g in sizes]  # bytes of each layer's bits
            self.kept_flat = torch.full((sum(packed),), 255, dtype=torch.uint8, device=dev)
            self.kept = list(self.kept_flat.split(packed))
        # layer index of every group, for the magnitude ratios (structured layers only)
        self._segment = torch.repeat_interleave(torch.arange(n, device=dev), torch.tensor(
            sizes if self.structured else [0] * n, dtype=torch.int64, device=dev))
        self._n_grow = torch.zeros(n, dtype=torch.int64, device=dev)
        self._finished = torch.zeros(n, dtype=torch.bool, device=dev)
        self._idle, self._any_idle = torch.zeros(n, dtype=torch.bool, device=dev), False
        self._hist = torch.full((n,), math.nan, dtype=torch.float64, device=dev)
        self.last_scores: list[torch.Tensor | None] = [None] * n
        self.iteration = 0           # completed steps
        self.version = 0             # counts changes of the kept masks (selections, loads)
        self._n_pick = 0             # GReg-2 uniform increments (identical for all layers)
        self._picked = method != "greg2"
        self._stabilize_end: int | None = None  # iteration at which the phase becomes "done"
        self.phase = "pick" if method == "greg2" else "grow"
        self._refresh_lambdas()

    @property
    def done(self) -> bool:
        return self.phase == "done"

    # ---- one step ----
    def begin_step(self) -> tuple[bool, bool]:
        """(update, pick_now): whether this step updates λ (the increments happen here, before
        the pass, since this step's λ does not depend on its scores) and whether GReg-2 picks."""
        update = self.phase in ("pick", "grow") and self.iteration % self.hyper["interval"] == 0
        return update, self._advance_counts() if update else False

    def wants_scores(self, update: bool, pick_now: bool) -> bool:
        # per-weight scores only when a pick needs them: kept they would cost 32 bits per weight
        return update and (self.structured or pick_now)

    def end_step(self, scores: list[torch.Tensor], pick_now: bool) -> None:
        """The score-dependent half of a λ update: picks, magnitude ratios, finishing; one host sync."""
        h = self.hyper
        if self.structured:
            self.last_scores = scores
        if pick_now:
            self.select(scores)  # on the current weights
            self._finished |= self._idle
        if not self._picked:
            return
        self._hist, finish = self._stopping(scores, ~self._finished)
        self._finished |= finish
        _from_rank0(self._finished, self._hist)
        if bool(self._finished.all()):
            self.phase = "stabilize"
            self._stabilize_end = self.iteration + h["stabilize"] + 1

    def _stopping(self, scores: list[torch.Tensor], active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stopping rule, for the host and the device schedule alike: ``(smoothed magnitude
        ratios, which active layers finish)``. A layer finishes when its λ passes the ceiling or its
        smoothed ratio reaches ``mag_ratio_limit`` (GReg-1: when every layer's has)."""
        h = self.hyper
        over_ceiling = torch.maximum(self.lam_selected, self.lam_kept) > h["ceiling"]
        if not self.structured:  # too costly per element in the reference, and not part of the method there
            return self._hist, active & over_ceiling
        ratio = self._magnitude_ratios(scores)
        smoothed = torch.where(self._hist.isnan(), ratio, _SMOOTHING * self._hist + (1 - _SMOOTHING) * ratio)
        hist = torch.where(active, smoothed, self._hist)
        strong = hist >= h["mag_ratio_limit"]
        if self.method == "greg1":  # GReg-1 stops on the ratio of every pruned layer
            strong = strong.all().expand_as(strong)
        return hist, active & (over_ceiling | strong)

    def advance(self) -> bool:
        """Count the step; True when it ends the stabilize phase (the caller prunes, see :meth:`finish`)."""
        self.iteration += 1
        return self.phase == "stabilize" and self.iteration >= self._stabilize_end

    def finish(self) -> None:
        """Pruned: no penalty from here on, the masks stay."""
        self.phase = "done"
        self._refresh_lambdas()

    def select(self, scores: Sequence[torch.Tensor]) -> None:
        """Each layer drops its ``n_prune`` lowest-score groups (ties: lowest index first)."""
        for i, layer in enumerate(self.layers):
            kept = keep_strongest(scores[i], layer.n_prune)
            self.kept[i].copy_(kept if self.structured else pack_bits(kept))
        _from_rank0(self.kept_flat)
        self._set_idle()
        self.version += 1

    def _set_idle(self) -> None:
        """Layers of a late allocation left with nothing to remove get no penalty."""
        if self.late_allocation and self._picked:
            idle = [l.n_prune == 0 for l in self.layers]
            self._idle, self._any_idle = torch.tensor(idle, dtype=torch.bool, device=self.device), any(idle)
            self._refresh_lambdas()

    def _advance_counts(self) -> bool:
        pick_now = False
        if not self._picked:
            self._n_pick += 1
            if _reached(self._n_pick * self.hyper["pick_delta"], self.hyper["pick_ceiling"]):
                self._picked, self.phase, pick_now = True, "grow", True
        else:
            self._n_grow += ~self._finished
        self._refresh_lambdas()
        return pick_now

    def _magnitude_ratios(self, scores: list[torch.Tensor]) -> torch.Tensor:
        """Mean score of kept groups / mean score of removed groups, every layer at once
        (float64 segment sums over the flat score and mask buffers; no host sync)."""
        s = torch.cat(scores).to(torch.float64)
        k = self.kept_flat.to(torch.float64)
        sums = torch.zeros(4, len(self.layers), dtype=torch.float64, device=s.device)
        for row, values in enumerate((s * k, k, s * (1 - k), 1 - k)):
            sums[row].index_add_(0, self._segment, values)
        return (sums[0] / sums[1]) / (sums[2] / sums[3])

    def _lambda_values(self, pick) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ selected, λ kept) in float64 from the counts; ``pick`` = n_pick * pick_delta, a float
        or a 0-d float64 tensor (the same IEEE products either way)."""
        h = self.hyper
        selected = pick + self._n_grow.to(torch.float64) * h["delta"]
        if self.method != "greg2":
            return selected, torch.zeros_like(selected)
        return selected, torch.where(self._n_grow > 0, torch.full_like(selected, h["recover"]),
                                     torch.zeros_like(selected) + pick)

    def _refresh_lambdas(self) -> None:
        self.lam_selected, self.lam_kept = self._lambda_values(self._n_pick * self.hyper["pick_delta"])
        if self._any_idle:
            self.lam_selected = self.lam_selected.masked_fill(self._idle, 0.0)
            self.lam_kept = self.lam_kept.masked_fill(self._idle, 0.0)
        # the kernels take fp32 λ; after pruning there is no penalty
        done = self.phase == "done"
        self.lam_selected32 = torch.zeros_like(self.lam_selected, dtype=torch.float32) if done else \
            self.lam_selected.float()
        self.lam_kept32 = torch.zeros_like(self.lam_kept, dtype=torch.float32) if done else self.lam_kept.float()

    # ---- views ----
    def group_lambdas(self, as_applied: bool = False) -> list[torch.Tensor]:
        """λ of every group, ``[n_groups]`` per layer: float64, or with ``as_applied`` the fp32
        values the kernels apply (0 once pruned)."""
        kept_lam, sel_lam = (self.lam_kept32, self.lam_selected32) if as_applied else (self.lam_kept, self.lam_selected)
        return [torch.where(kept_bool(l, k), kept_lam[i], sel_lam[i])
                for i, (l, k) in enumerate(zip(self.layers, self.kept))]

    def penalties(self) -> dict[str, torch.Tensor]:
        """Current λ per group, ``{layer: float64 [n_groups]}``."""
        return dict(zip((l.name for l in self.layers), self.group_lambdas()))

    def lambdas(self) -> dict[str, tuple[float, float]]:
        """``{layer: (λ selected, λ kept)}`` as Python floats (one host sync)."""
        sel, kept = self.lam_selected.tolist(), self.lam_kept.tolist()
        return {l.name: (s, k) for l, s, k in zip(self.layers, sel, kept)}

    def magnitude_ratios(self) -> dict[str, float]:
        return dict(zip((l.name for l in self.layers), self._hist.tolist()))

    def state_bytes(self) -> int:
        """Bytes kept on the device: masks (a bool per group, or a bit per weight for unstructured
        layers), per-layer counts, ratios and λ, and the latest group scores of structured layers."""
        tensors = [self.kept_flat, self._n_grow, self._finished, self._hist, self._segment,
                   self.lam_selected, self.lam_kept, self.lam_selected32, self.lam_kept32]
        tensors += [s for s in self.last_scores if s is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- checkpointing ----
    def state_dict(self) -> dict:
        return {
            "method": self.method, "hyper": dict(self.hyper), "phase": self.phase,
            "layers": [l.name for l in self.layers], "n_groups": [l.n_groups for l in self.layers],
            "n_prune": [l.n_prune for l in self.layers], "granularity": [l.granularity for l in self.layers],
            "iteration": self.iteration, "n_pick": self._n_pick,
            "picked": self._picked, "stabilize_end": self._stabilize_end,
            "n_grow": self._n_grow.clone(), "finished": self._finished.clone(), "hist": self._hist.clone(),
            "kept": [k.clone() for k in self.kept],
            "scores": [s.clone() if s is not None else None for s in self.last_scores],
        }

    def check_state_dict(self, g: dict) -> list[torch.Tensor]:
        """Raise ValueError naming the first way ``g`` does not fit this schedule (method, layers,
        ratios, granularity, settings, masks); returns its masks on this device."""
        if g["method"] != self.method:
            raise ValueError(f"checkpoint is for method {g['method']!r}, this GrowingReg runs {self.method!r}")
        names, groups = [l.name for l in self.layers], [l.n_groups for l in self.layers]
        if g["layers"] != names or g["n_groups"] != groups:
            raise ValueError("checkpoint was saved for other layers: "
                             f"{list(zip(g['layers'], g['n_groups']))[:4]}... vs {list(zip(names, groups))[:4]}...")
        for key in ("n_prune", "granularity"):
            mine = [getattr(l, key) for l in self.layers]
            if key in g and g[key] != mine:
                bad = next(i for i, (a, b) in enumerate(zip(g[key], mine)) if a != b)
                raise ValueError(f"checkpoint was saved for a plan with other {key}: layer {names[bad]!r} has "
                                 f"{key}={g[key][bad]!r} there, {mine[bad]!r} in this plan")
        for key, value in self.hyper.items():
            if g["hyper"].get(key) != value:
                raise ValueError(f"checkpoint was saved with {key}={g['hyper'].get(key)!r}, "
                                 f"this GrowingReg has {key}={value!r}")
        if g["phase"] not in PHASES:
            raise ValueError(f"checkpoint has unknown phase {g['phase']!r}")
        kept = [k.to(self.device) for k in g["kept"]]
        if [(k.dtype, k.shape) for k in kept] != [(v.dtype, v.shape) for v in self.kept]:
            raise ValueError("checkpoint masks do not match this plan's layers")
        for layer, k in zip(self.layers, kept):  # a selection removes exactly n_prune groups
            removed = layer.n_groups - int(kept_bool(layer, k).sum())
            if removed not in (0, layer.n_prune) or (removed == 0 and g["picked"] and layer.n_prune):
                raise ValueError(f"checkpoint mask of {layer.name!r} removes {removed} groups, this plan "
                                 f"prunes {layer.n_prune}: it was saved for a plan with other ratios")
        return kept

    def load_state_dict(self, g: dict, kept: list[torch.Tensor]) -> None:
        """Take ``g`` (checked by :meth:`check_state_dict`, which gave ``kept``)."""
        dev = self.device
        self.phase, self.iteration = g["phase"], g["iteration"]
        self._n_pick, self._picked, self._stabilize_end = g["n_pick"], g["picked"], g["stabilize_end"]
        self._n_grow = g["n_grow"].to(dev, torch.int64)
        self._finished = g["finished"].to(dev, torch.bool)
        self._hist = g["hist"].to(dev, torch.float64)
        for view, k in zip(self.kept, kept):
            view.copy_(k)
        self._set_idle()
        self.version += 1
        self.last_scores = [s.to(dev) if s is not None else None for s in g["scores"]]
        self._refresh_lambdas()


class _OnDevice:
    """A host attribute of :class:`Schedule` (an int, bool, None or phase name) that
    :class:`DeviceSchedule` holds as a 0-d int64 device tensor: assigning writes in place (a captured
    graph keeps the tensor's address), reading syncs."""

    def __init__(self, encode=int, decode=int):
        self.encode, self.decode = encode, decode

    def __set_name__(self, owner, name):
        self.key = "_dev" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else self.decode(int(obj.__dict__[self.key]))

    def __set__(self, obj, value):
        t = obj.__dict__.get(self.key)
        if t is None:
            obj.__dict__[self.key] = torch.tensor(self.encode(value), dtype=torch.int64, device=obj.device)
        else:
            t.fill_(self.encode(value))


class DeviceSchedule(Schedule):
    """The schedule of a capturable GrowingReg: the same decisions as :class:`Schedule`, step for
    step, made with tensor ops on the device, so that no step reads a value back to the host
    (a compiled step is one graph; a CUDA graph replays it). Phase, iteration, the pick count and
    the stabilize end are 0-d device tensors; every state write is in place. A step runs
    :meth:`device_begin`, the pass (scores of every step: the host cannot know which step updates
    λ), :meth:`device_end` and :meth:`device_advance`, each gated by ``ok``, the step's device-side
    finite check. Selections, λ updates, finishing and pruning happen under ``torch.where``.
    Host reads (``phase``, ``iteration``, ``done``, ``state_dict``) sync where the user asks."""

    phase = _OnDevice(PHASES.index, PHASES.__getitem__)
    iteration = _OnDevice()
    _n_pick = _OnDevice()
    _picked = _OnDevice(int, bool)
    _stabilize_end = _OnDevice(lambda v: -1 if v is None else v, lambda v: None if v < 0 else v)

    def __init__(self, layers, method, hyper, device, late_allocation=False):
        if late_allocation:
            raise ValueError("a capturable GrowingReg cannot run GReg-2 on a global budget: the budget is "
                             "allocated on the host at the pick; plan with allocation='uniform' or capturable=False")
        super().__init__(layers, method, hyper, device)
        if not self.structured:
            raise ValueError("a capturable GrowingReg needs structured layers: an unstructured pick ranks every "
                             "weight, so every step would score every weight; use capturable=False")
        self.last_scores = [torch.zeros(l.n_groups, dtype=torch.float32, device=device) for l in self.layers]
        self._scored = torch.zeros((), dtype=torch.bool, device=device)  # any λ update yet (host: scores not None)
        h = self.hyper
        self._pick_threshold = h["pick_ceiling"] * (1 - 1e-9) if h["pick_ceiling"] > 0 else h["pick_ceiling"]

    def _t(self, name: str) -> torch.Tensor:
        return self.__dict__["_dev" + name]

    def _refresh_lambdas(self) -> None:
        selected, kept = self._lambda_values(self._t("_n_pick").to(torch.float64) * self.hyper["pick_delta"])
        done = self._t("phase") == PHASES.index("done")
        values = {"lam_selected": selected, "lam_kept": kept,  # the kernels take fp32 λ, 0 once pruned
                  "lam_selected32": torch.where(done, 0.0, selected).float(),
                  "lam_kept32": torch.where(done, 0.0, kept).float()}
        for name, value in values.items():
            if name in self.__dict__:
                self.__dict__[name].copy_(value)
            else:
                self.__dict__[name] = value

    # ---- one step, on the device ----
    def device_begin(self, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The λ increments of a due update (:meth:`Schedule.begin_step`); returns ``(update,
        pick_now, mask)``, mask: the step is after pruning (the masked pass)."""
        phase, picked = self._t("phase"), self._t("_picked")
        mask = phase == PHASES.index("done")
        update = ok & (phase <= PHASES.index("grow")) & (self._t("iteration") % self.hyper["interval"] == 0)
        pick_step = update & (picked == 0)
        n_pick = self._t("_n_pick")
        n_pick += pick_step
        pick_now = pick_step & (n_pick.to(torch.float64) * self.hyper["pick_delta"] >= self._pick_threshold)
        self._n_grow += update & (picked == 1) & ~self._finished
        picked |= pick_now
        phase.copy_(torch.where(pick_now, PHASES.index("grow"), phase))
        self._refresh_lambdas()
        return update, pick_now, mask

    def device_end(self, scores: list[torch.Tensor], update: torch.Tensor, pick_now: torch.Tensor) -> None:
        """:meth:`Schedule.end_step` under ``update``: picks, magnitude ratios, finishing."""
        h = self.hyper
        for last, s in zip(self.last_scores, scores):
            last.copy_(torch.where(update, s, last))
        self._scored |= update
        for layer, kept, s in zip(self.layers, self.kept, scores):
            kept.copy_(torch.where(pick_now, keep_strongest(s, layer.n_prune), kept))
        counting = update & (self._t("_picked") == 1)
        hist, finish = self._stopping(scores, counting & ~self._finished)
        self._hist.copy_(hist)
        self._finished |= finish
        _from_rank0(self.kept_flat, self._finished, self._hist)  # one broadcast a step: rank 0's state
        stabilize = counting & self._finished.all()
        phase, it = self._t("phase"), self._t("iteration")
        phase.copy_(torch.where(stabilize, PHASES.index("stabilize"), phase))
        end = self._t("_stabilize_end")
        end.copy_(torch.where(stabilize, it + h["stabilize"] + 1, end))

    def device_advance(self, ok: torch.Tensor) -> torch.Tensor:
        """Count the step (:meth:`Schedule.advance`); returns whether it prunes now (the phase is
        then ``done``: λ 0 from here on)."""
        phase, it = self._t("phase"), self._t("iteration")
        it += ok
        prune = ok & (phase == PHASES.index("stabilize")) & (it >= self._t("_stabilize_end"))
        phase.copy_(torch.where(prune, PHASES.index("done"), phase))
        self._refresh_lambdas()
        return prune

    # ---- checkpointing: the host format, written in place ----
    def state_dict(self) -> dict:
        state = super().state_dict()
        if not bool(self._scored):
            state["scores"] = [None] * len(self.layers)
        return state

    def load_state_dict(self, g: dict, kept: list[torch.Tensor]) -> None:
        held = {k: getattr(self, k) for k in ("_n_grow", "_finished", "_hist")}
        scores = self.last_scores
        super().load_state_dict(g, kept)
        for name, t in held.items():
            t.copy_(getattr(self, name))
            setattr(self, name, t)
        loaded = self.last_scores
        for t, s in zip(scores, loaded):
            t.copy_(s) if s is not None else t.zero_()
        self.last_scores = scores
        self._scored.fill_(any(s is not None for s in loaded))
