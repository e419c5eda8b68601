"""GrowingReg: GReg-1, GReg-2 and one-shot L1 as a wrapper around any torch.optim optimizer.

A small class, as torch.optim's: it composes a :class:`~greg_fast.regularizer.Regularizer`
(schedule, slice map, backend: the penalty pass and the zeroing of removed groups) with an inner
step (:mod:`greg_fast.inner`: the inner optimizer, or with ``fused=True`` the SGD update fused into
the pass), and picks its step implementation once at construction: :func:`_host_step` or
:func:`_capturable_step`, each straight-line code. Construction-time refusals live in
:mod:`greg_fast.refusals`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .backend import resolve as resolve_backend
from .budget import allocate
from .guard import finite_grads, grads_finite
from .hyper import Hyper
from .inner import FusedSGDStep, InnerStep, OptimizerWrapper
from .refusals import check_arguments, check_capturable, check_holds, one_device
from .regularizer import Regularizer
from .result import Plan
from .slices import plan_scores


def _evaluate(closure: Callable[[], Any] | None):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _host_step(greg: "GrowingReg", closure: Callable[[], Any] | None):
    """NaN guard (one host sync) -> λ update when due and the penalty pass -> the inner step ->
    the schedule advances (and prunes at the end of stabilize)."""
    loss = _evaluate(closure)
    if greg.nan_guard and not grads_finite(greg.optimizer):
        greg._skipped += 1  # nothing reaches λ, the schedule or the weights
        greg._skipped_in_a_row += 1
        greg.check()
        return loss
    greg._skipped_in_a_row = 0
    reg, inner = greg._reg, greg._inner
    reg.regularize(inner.sgd_args())
    inner.step(closure=reg.penalized(closure) if closure is not None and inner.needs_closure else None)
    if reg.schedule.advance():
        reg.prune(greg.optimizer.state)
    return loss


def _capturable_step(greg: "GrowingReg", closure: Callable[[], Any] | None):
    """The same step with every decision a tensor op: no host sync (a compiled step is one graph).
    A non-finite step is skipped on the device (``ok``)."""
    loss = _evaluate(closure)
    ok = finite_grads(greg.optimizer) if greg.nan_guard else None
    ok = greg._all_finite if ok is None else ok
    skip = ~ok
    reg, inner = greg._reg, greg._inner
    reg.device_pass(ok, inner.sgd_args(skip))
    inner.step(skip)
    with torch.no_grad():
        reg.zero_pruned(greg.optimizer.state, reg.schedule.device_advance(ok))
        greg._skipped += skip
        greg._skipped_in_a_row.copy_(torch.where(ok, 0, greg._skipped_in_a_row + 1))
    return loss


class GrowingReg(OptimizerWrapper):
    """Wrap ``optimizer`` so that ``step()`` adds the growing-regularization penalty.

    ``method``: ``greg1``, ``greg2`` or ``l1``; ``**settings``: the schedule, any field of
    :class:`greg_fast.Hyper` (``delta``, ``interval``, ``ceiling``, ``stabilize``, ``pick_delta``,
    ``pick_ceiling``, ``recover``, ``mag_ratio_limit``; reference CIFAR defaults); an unknown
    name raises.

    With ``nan_guard`` (the default), a step whose gradients are not all finite is skipped and
    counted in ``skipped_steps``: nothing reaches λ, the schedule or the weights; after
    ``max_skipped_in_a_row`` skipped steps in a row (training has diverged and the schedule would
    never advance) ``step()`` raises. The check is the only host sync outside λ updates;
    ``nan_guard=False`` (e.g. under a GradScaler, which guards itself) makes ordinary steps sync-free.

    ``penalize`` says what a unit's λ applies to and its score averages over: ``"filters"`` (a
    group's producers' and depthwise convs' filter rows: on a single layer exactly the reference's
    method) or ``"group"`` (every parameter entry that goes with the channel: also biases,
    BatchNorm weight and bias, layer scales and the consumers' columns; of a single layer too).

    ``step(closure)`` evaluates the closure once for the schedule; an inner optimizer that needs
    the closure itself (LBFGS) gets one that adds the penalty to every re-evaluation (gradient
    ``λ_g·w`` and loss ``½ Σ λ_g ‖w_g‖²``).

    A plan made to a budget with ``allocation="global"`` (``plan(model, target=..., allocation=
    "global")``) is allocated again from this wrapper's own scores: GReg-1 and L1 at construction,
    GReg-2 at its pick (until then it regularizes every unit the budget may cut; a unit left with
    nothing to cut gets λ = 0). The plan's counts follow, and ``state_dict`` carries them.

    ``capturable=True`` keeps the schedule (phases, λ counts, finished flags, selections, skipped
    counts) in device tensors that advance with tensor ops, so no step reads back to the host:
    ``torch.compile(opt.step, fullgraph=True)`` and a compiled training step trace with no graph
    break in any phase, and the step can be captured in a CUDA graph. The nan guard then skips a
    non-finite step on the device; the "too many skipped in a row" error is raised by
    :meth:`check` (call it every N steps or per epoch), and ``done``, ``phase``, ``iteration``
    and ``lambdas()`` each read the device once when asked. Learning rates may be 0-d tensors
    (update them in place under a CUDA graph). What cannot run that way is refused here with what
    to change: LBFGS, a non-capturable inner optimizer on CUDA, GReg-2 on a global budget,
    unstructured plans. Every backend's step is a registered op (``torch.ops.greg_fast``) or
    plain PyTorch.

    ``step()`` after ``loss.backward()``: :meth:`apply_penalty` (λ update every ``interval``
    iterations, then ``grad += λ_g * w``; after pruning, zero the removed groups' gradients), the
    inner optimizer's step, then the schedule advances. Phases: ``pick`` (GReg-2 only), ``grow``,
    ``stabilize``, ``done``. At ``done`` the removed groups are zeroed (weights, biases, following
    BatchNorms and the optimizer state of those entries) and stay zero while training goes on:
    the fine-tune of the reference, masks kept.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: Plan, *, method: str = "greg1",
                 backend: str = "auto", fused: bool = False, nan_guard: bool = True,
                 max_skipped_in_a_row: int = 100, penalize: str = "filters", capturable: bool = False,
                 **settings):
        check_arguments(optimizer, plan, max_skipped_in_a_row, penalize)
        self._init_optimizer_hooks()
        self._hyper = Hyper.from_settings(method, **settings)
        self.optimizer, self.plan, self.penalize = optimizer, plan, penalize
        self.device = one_device(plan)
        self._backend_name = resolve_backend(backend, self.device).name  # a name: deepcopy-able
        self.fused, self.nan_guard, self.capturable = fused, nan_guard, capturable
        self.max_skipped_in_a_row = max_skipped_in_a_row
        # steps refused for non-finite gradients, all and in a row: ints, or 0-d device tensors
        zero = torch.zeros((), dtype=torch.int64, device=self.device) if capturable else 0
        self._skipped, self._skipped_in_a_row = zero, zero.clone() if capturable else 0
        self._take_step = _capturable_step if capturable else _host_step
        budget = plan.budget
        # a global budget allocates from scores: GReg-1 and L1 from the weights now, GReg-2 at its pick
        # (it regularizes every unit the budget may cut until then)
        self._allocates_at_pick = budget is not None and budget.by_score and method == "greg2"
        if capturable:
            check_capturable(optimizer, nan_guard, self.device)
        if budget is not None and budget.by_score and method != "greg2":
            allocate(plan, plan_scores(plan, budget.units(plan), penalize))
        self._setup(budget.units(plan) if self._allocates_at_pick else plan.pruned, method)
        frozen = [l.name for l in self.layers
                  if not all(s.param.requires_grad for s in l.slices(plan.module, penalize))]
        if frozen:
            warnings.warn(f"planned layers {frozen[:5]} are frozen (requires_grad=False): they get no "
                          "gradient, so they lose their groups without being regularized", stacklevel=2)
        if method != "greg2":  # GReg-1 and L1 select on the weights as they are
            self._reg.select()
        if method == "l1" or not self.layers:
            self._reg.prune(optimizer.state)

    def _setup(self, units, method: str) -> None:
        """The regularizer of ``units`` and the inner step that goes with it."""
        self._reg = Regularizer(self.plan, units, method, self._hyper, penalize=self.penalize, device=self.device,
                                backend=self._backend_name, whole=self.fused, capturable=self.capturable,
                                allocates_at_pick=self._allocates_at_pick)
        check_holds(self.optimizer, self._reg.slices)
        kind = dict(capturable=self.capturable, nan_guard=self.nan_guard)
        self._inner = (FusedSGDStep(self.optimizer, self._reg.slices, penalize=self.penalize, **kind) if self.fused
                       else InnerStep(self.optimizer, **kind))
        if self.capturable:
            self._all_finite = torch.ones((), dtype=torch.bool, device=self.device)

    def __repr__(self) -> str:
        return (f"GrowingReg(method={self.method}, phase={self.phase}, iteration={self.iteration}, "
                f"layers={len(self.layers)}, backend={self.backend.name}, optimizer={type(self.optimizer).__name__})")

    # ---- the regularizer and its schedule, as the user sees them ----
    @property
    def backend(self):
        return self._reg.backend

    @property
    def schedule(self):
        return self._reg.schedule

    @property
    def layers(self) -> list:
        """The regularized units, in plan order."""
        return self._reg.layers

    @property
    def slices(self) -> list:
        """What the backends regularize: the units, or for coupled groups runs of their parameters."""
        return self._reg.slices

    @property
    def method(self) -> str:
        return self.schedule.method

    @property
    def hyper(self) -> dict:
        return self.schedule.hyper

    @property
    def phase(self) -> str:
        return self.schedule.phase

    def max_steps(self) -> int:
        """Steps from construction until ``done``: exact for L1 and wherever the magnitude ratio does
        not stop growth before the ceiling (:meth:`Hyper.max_steps`), else an upper bound; a trainer's
        ``max_steps`` for the regularization phase."""
        return self._hyper.max_steps(self.method)

    @property
    def done(self) -> bool:
        return self.schedule.done

    @property
    def iteration(self) -> int:
        """Completed (not skipped) steps."""
        return self.schedule.iteration

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients."""
        return int(self._skipped)

    # ---- one step ----
    def step(self, closure: Callable[[], Any] | None = None):
        self.plan.check_current()
        return self._take_step(self, closure)

    def apply_penalty(self) -> None:
        """Update λ when due, then ``grad += λ_g * w`` (once pruned: zero the removed groups'
        weights and gradients instead)."""
        self._reg.regularize()

    def check(self) -> None:
        """Raise if the last ``max_skipped_in_a_row`` steps were all skipped for non-finite gradients
        (training has diverged and the schedule cannot advance). Every step does this itself; a
        capturable GrowingReg counts on the device and checks only here (one host sync): call it
        every N steps or at the end of an epoch."""
        in_a_row = int(self._skipped_in_a_row)
        if in_a_row >= self.max_skipped_in_a_row:
            raise RuntimeError(
                f"{in_a_row} steps in a row had non-finite gradients and were skipped, so "
                "the schedule cannot advance: training has diverged (lower the learning rate or delta, "
                "or raise max_skipped_in_a_row)")

    # ---- views of the state ----
    def state_bytes(self) -> int:
        """Bytes the schedule keeps on the device besides the optimizer (see Schedule.state_bytes)."""
        return self.schedule.state_bytes()

    def masks(self) -> dict[str, torch.Tensor]:
        """``{layer: bool mask}``, True = kept, for every planned layer (all True where nothing is
        selected yet or nothing is pruned): ``[n_groups]`` for filters and channels, the weight's
        shape for unstructured layers (so that ``weight * mask`` is the pruned weight)."""
        return self._reg.masks()

    def penalties(self) -> dict[str, torch.Tensor]:
        """Current λ per group, ``{layer: float64 [n_groups]}``, for the regularized layers."""
        return self.schedule.penalties()

    def lambdas(self) -> dict[str, tuple[float, float]]:
        """``{layer: (λ selected, λ kept)}`` as Python floats (one host sync)."""
        return self.schedule.lambdas()

    def scores(self) -> dict[str, torch.Tensor]:
        """Per-group scores (mean |w|) computed at the latest λ update (now, if none yet)."""
        return self._reg.scores()

    def current_scores(self, name: str) -> torch.Tensor:
        """One regularized unit's per-group scores (mean |w| of what it penalizes), computed now."""
        return self._reg.current_scores(name)

    def magnitude_ratios(self) -> dict[str, float]:
        """Smoothed magnitude ratio (mean kept score / mean removed score) per layer, NaN before any."""
        return self.schedule.magnitude_ratios()

    # ---- checkpointing ----
    def state_dict(self) -> dict:
        """Inner optimizer state and the whole schedule; loads with ``torch.load(weights_only=True)``.
        State-dict hooks registered on this wrapper run as on any optimizer."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {"optimizer": self.optimizer.state_dict(),
                 "greg": {**self.schedule.state_dict(), "skipped_steps": self.skipped_steps,
                          "penalize": self.penalize}}
        for hook in self._optimizer_state_dict_post_hooks.values():
            state = hook(self, state) or state
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        try:
            g, opt = state_dict["greg"], state_dict["optimizer"]
        except (KeyError, TypeError) as err:
            raise ValueError("not a GrowingReg state_dict (expected keys 'optimizer' and 'greg')") from err
        if g.get("penalize", "filters") != self.penalize:
            raise ValueError(f"checkpoint was saved with penalize={g.get('penalize')!r}, this GrowingReg has "
                             f"penalize={self.penalize!r}")
        before = None
        if self.plan.budget is not None and self.plan.budget.by_score:  # the run's own allocation
            counts = self.plan.budget.check_counts(self.plan, dict(zip(g["layers"], g.get("n_prune", []))))
            before = ({l.name: l.n_prune for l in self.plan.layers}, dict(self.__dict__))
            self.plan.set_counts(counts)
            if not self._allocates_at_pick:
                self._setup(self.plan.pruned, self.method)
        try:
            kept = self.schedule.check_state_dict(g)  # everything checked before anything is loaded
        except ValueError:
            if before is not None:  # leave the plan, the schedule and the slices as they were
                self.plan.set_counts(before[0])
                self.__dict__.update(before[1])
            raise
        self.optimizer.load_state_dict(opt)
        self.schedule.load_state_dict(g, kept)
        self._reg.forget_removed()
        if self.capturable:  # in place: a captured graph holds these tensors
            self._skipped.fill_(g.get("skipped_steps", 0))
            self._skipped_in_a_row.zero_()
        else:
            self._skipped = g.get("skipped_steps", 0)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
