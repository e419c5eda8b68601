"""The penalty side of GrowingReg: the regularized units as the backends see them (a
:class:`~greg_fast.slices.SliceMap`), their :class:`~greg_fast.schedule.Schedule` and the backend,
one pass over the weights per step, and after pruning the removed groups kept at zero.

A global budget allocated at GReg-2's pick is allocated here, from the pick's scores, before the
schedule selects: the schedule calls nobody.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Sequence

import torch

from .backend import SGDArgs, StepBatch, module as backend_module
from .budget import allocate
from .hyper import Hyper
from .masks import expand_groups, kept_bool, masked_tensors, zero_removed
from .result import Plan
from .schedule import DeviceSchedule, Schedule
from .slices import SliceMap
from .units import LayerPlan


class Regularizer:
    """``units`` of ``plan`` regularized by ``method`` on ``device`` through backend ``backend``
    (a name: deepcopy-able). ``whole``: the fused SGD step's slice map (every row of a penalized
    parameter); ``capturable``: the schedule on the device; ``allocates_at_pick``: a global budget
    allocated from the scores of GReg-2's pick."""

    def __init__(self, plan: Plan, units: Sequence[LayerPlan], method: str, hyper: Hyper, *, penalize: str,
                 device: torch.device, backend: str, whole: bool, capturable: bool, allocates_at_pick: bool):
        self.plan, self.layers, self.device = plan, list(units), device
        self.backend_name, self.capturable, self.allocates_at_pick = backend, capturable, allocates_at_pick
        self.map = SliceMap(self.layers, plan.module, penalize, device, whole=whole, cache=not capturable)
        self.slices = self.map.slices
        self.memo: dict = {}  # host work a backend reuses across steps (triton: its launches)
        self._removed_grads = None  # after pruning (host): (tensor, removed entries) whose gradients stay zero
        self.schedule = (DeviceSchedule if capturable else Schedule)(self.layers, method, hyper, device,
                                                                     late_allocation=allocates_at_pick)
        if capturable:
            self._setup_capturable()

    @property
    def backend(self) -> ModuleType:
        return backend_module(self.backend_name)

    # ---- one pass over the weights ----
    def batch(self, sgd: SGDArgs | None = None) -> StepBatch:
        s, m = self.schedule, self.map
        kept = m.kept(s.kept, s.version)
        lam_kept, lam_selected = m.per_slice(s.lam_kept32), m.per_slice(s.lam_selected32)
        # no cross tables under a capturable schedule: its steps always score while they may mask,
        # which runs the passes one after the other (see greg_fast.backend.triton)
        cross = m.cross(kept, lam_kept, lam_selected) if sgd is None and not self.capturable else None
        return StepBatch(self.slices, kept, lam_kept, lam_selected, sgd, passes=m.passes, cross=cross, memo=self.memo)

    def penalty_pass(self, sgd: SGDArgs | None, *, want_scores: bool, mask) -> list[torch.Tensor] | None:
        """``grad += λ_g·w`` (with ``sgd`` the SGD update too) over every slice; after pruning
        (``mask``, a bool or a capturable step's 0-d flag) the removed groups' weights and gradients
        are zeroed instead, the other members' gradients too. Returns the units' group scores when
        asked."""
        scores = self.backend.step(self.batch(sgd), want_scores=want_scores, mask=mask)
        if mask is not False:  # before pruning (a host step's common case) nothing is zeroed
            self._zero_removed_grads(mask)
        return self.map.unit_scores(scores) if scores is not None else None

    @torch.no_grad()
    def regularize(self, sgd: SGDArgs | None = None) -> None:
        """A host step's pass, with the λ update split around it: the λ of this step does not depend
        on this step's scores (increments come first, the pick happens while λ is uniform), so one
        pass serves both."""
        s = self.schedule
        done = s.done
        update, pick_now = s.begin_step()
        scores = self.penalty_pass(sgd, want_scores=s.wants_scores(update, pick_now), mask=done)
        if update:
            self._allocate(scores, pick_now)
            s.end_step(scores, pick_now)

    def device_pass(self, ok: torch.Tensor, sgd: SGDArgs | None) -> None:
        """A capturable step's pass: every decision under ``ok`` (the step's finite check) on the device."""
        s = self.schedule
        with torch.no_grad():
            update, pick_now, mask = s.device_begin(ok)
            s.device_end(self.penalty_pass(sgd, want_scores=True, mask=mask), update, pick_now)

    def _allocate(self, scores, pick_now: bool) -> None:
        """GReg-2 with a global budget: the counts from the scores of all units at the pick."""
        if pick_now and self.allocates_at_pick:
            allocate(self.plan, dict(zip((l.name for l in self.layers), scores)))

    def penalized(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` whose every evaluation also carries this step's penalty (λ fixed): gradient
        ``λ_g·w`` and loss ``½ Σ λ_g ‖w_g‖²``."""
        def evaluate():
            with torch.enable_grad():
                loss = closure()
            with torch.no_grad():
                self.penalty_pass(None, want_scores=False, mask=self.schedule.done)
                lams = self.map.by_channel(self.schedule.group_lambdas(as_applied=True), filler=0.0)
                energy = sum(0.5 * (expand_groups(s, lam) * s.weight.detach().square()).sum()
                             for s, lam in zip(self.slices, lams))
            return loss + energy if loss is not None else loss
        return evaluate

    # ---- scores and selections ----
    def scores_now(self) -> list[torch.Tensor]:
        """Every unit's group scores (mean |w| of what it penalizes), computed now."""
        return self.map.unit_scores(self.backend.scores(self.slices))

    def select(self) -> None:
        """GReg-1 and L1: select on the weights as they are."""
        self.schedule.select(self.scores_now())

    # ---- after pruning: removed groups stay exactly zero ----
    def prune(self, state: dict) -> None:
        """Zero the removed groups in the weights, biases, following BatchNorms and in every
        optimizer state tensor shaped like them (``state``), so that SGD (momentum, weight decay),
        Adam and AdamW leave those entries at zero; the backend's masked pass keeps them there."""
        self.schedule.finish()
        self.zero_pruned(state)

    @torch.no_grad()
    def zero_pruned(self, state: dict, now: torch.Tensor | None = None) -> None:
        """The zeroing of :meth:`prune`; with ``now`` (a capturable step's 0-d flag) a masked write
        that zeroes only when it is set."""
        zero_removed(self._removed(), state=state, when=now)

    def _removed(self, others_only: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(tensor, removed entries)`` of every masked member; ``others_only``: those the backend's
        masked pass does not zero (biases, BatchNorms, other members; not the penalized weights)."""
        penalized = {id(s.param) for s in self.slices}
        return [(t, ~keep) for layer, kept in zip(self.layers, self.schedule.kept)
                if not others_only or layer.granularity != "weight"
                for t, keep in masked_tensors(self.plan, layer, kept)
                if not others_only or id(t) not in penalized]

    def _zero_removed_grads(self, mask) -> None:
        """After pruning, the removed groups' gradients of the members the pass does not zero. A
        capturable step calls it every step with its 0-d ``mask`` flag (masks may change on the
        device); on the host the list is built once, as the masks no longer change."""
        if isinstance(mask, torch.Tensor):
            zero_removed(self._removed(others_only=True), grads=True, when=mask)
        elif mask:
            if self._removed_grads is None:
                self._removed_grads = self._removed(others_only=True)
            zero_removed(self._removed_grads, grads=True)

    def forget_removed(self) -> None:
        """The masks changed (a checkpoint was loaded): rebuild the list of removed entries."""
        self._removed_grads = None

    def _setup_capturable(self) -> None:
        """Device-side checks and buffers before any compile (shapes fixed, masks not)."""
        members = [masked_tensors(self.plan, l, k) for l, k in zip(self.layers, self.schedule.kept)]
        elsewhere = sorted({f"{t.device}" for pairs in members for t, _ in pairs} - {str(self.device)})
        if elsewhere:
            raise ValueError(f"capturable=True keeps the masks on {self.device}, but tensors the pruning zeroes are "
                             f"on {elsewhere}: move the whole model to one device")
        self.map.kept(self.schedule.kept, self.schedule.version)  # its in-place buffers, before any compile
        if hasattr(self.backend, "capture"):  # what the backend's op needs registered before a compile
            self.backend.capture(self.slices, self.memo)

    # ---- read-outs ----
    def masks(self) -> dict[str, torch.Tensor]:
        def shaped(layer, kept):
            return kept.view(layer.weight.shape) if layer.granularity == "weight" else kept
        kept = dict(zip((l.name for l in self.layers), self.schedule.kept))
        return {l.name: shaped(l, kept_bool(l, kept[l.name]).clone() if l.name in kept else
                               torch.ones(l.n_groups, dtype=torch.bool, device=self.device))
                for l in self.plan.layers}

    def scores(self) -> dict[str, torch.Tensor]:
        last = self.schedule.last_scores
        if not self.schedule.structured or any(s is None for s in last):
            last = self.scores_now()
        return dict(zip((l.name for l in self.layers), last))

    def current_scores(self, name: str) -> torch.Tensor:
        i = next(i for i, l in enumerate(self.layers) if l.name == name)
        return self.map.unit_scores_of(i, self.backend.scores)
