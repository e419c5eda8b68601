"""GrowingReg: GReg-1, GReg-2 and one-shot L1 as a wrapper around any torch.optim optimizer.

It composes the :class:`~greg_fast.schedule.Schedule` (phases, λ, selections; pure bookkeeping)
with the inner optimizer and a backend's step over the regularized weights (penalty, or with
``fused=True`` the whole SGD update), and after pruning keeps the removed groups at zero.
"""
from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from types import ModuleType
from typing import Any, Callable

import torch

from .budget import allocate
from .backend import SGDArgs, StepBatch, module as backend_module, resolve as resolve_backend
from .guard import finite_grads, grads_finite
from .hyper import Hyper
from .masks import expand_groups, kept_bool, masked_tensors
from .result import Plan
from .units import PENALIZE, Slice
from .schedule import DeviceSchedule, Schedule
from .slices import SliceMap, plan_scores


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step takes its closure as a required argument (LBFGS)."""
    param = inspect.signature(optimizer.step).parameters.get("closure")
    return param is not None and param.default is inspect.Parameter.empty


def _unwrapped_step(optimizer: torch.optim.Optimizer) -> Callable[[], Any]:
    """The optimizer class's own ``step``, without torch's hook and grad-mode wrappers."""
    step = type(optimizer).step
    while hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return lambda: step(optimizer)


def _state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor, with_param: bool) -> list[torch.Tensor]:
    """The tensors a step of ``optimizer`` writes for ``param``: its state (and the parameter)."""
    state = [v for v in optimizer.state.get(param, {}).values() if isinstance(v, torch.Tensor)]
    return [param, *state] if with_param else state


class GrowingReg(torch.optim.Optimizer):
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

    For a coupled plan, ``penalize`` says what a group's λ applies to and its score averages over:
    ``"filters"`` (its producers' and depthwise convs' filter rows: on an uncoupled layer exactly the
    reference's method) or ``"group"`` (every parameter entry that goes with the channel: also
    biases, BatchNorm weight and bias, layer scales and the consumers' columns).

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
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GrowingReg wraps a torch.optim optimizer, e.g. GrowingReg(torch.optim.SGD("
                            f"model.parameters(), lr=1e-3), plan); got {type(optimizer).__name__}")
        if not isinstance(plan, Plan):
            raise TypeError(f"GrowingReg needs the Plan returned by greg_fast.plan(model, ...), "
                            f"got {type(plan).__name__}")
        plan.check_current()
        self._init_optimizer_hooks()
        hyper = Hyper.from_settings(method, **settings)
        if not isinstance(max_skipped_in_a_row, int) or max_skipped_in_a_row < 1:
            raise ValueError(f"max_skipped_in_a_row must be an integer >= 1, got {max_skipped_in_a_row!r}")
        if penalize not in PENALIZE:
            raise ValueError(f"penalize must be one of {PENALIZE}, got {penalize!r}")
        self.penalize = penalize
        self.optimizer = optimizer
        self.plan = plan
        devices = {l.weight.device for l in plan.layers}
        if len(devices) > 1:
            raise ValueError(f"the planned layers are on several devices {sorted(map(str, devices))}; "
                             "GrowingReg keeps its state on one device")
        self.device = devices.pop() if devices else torch.device("cpu")
        self._backend_name = resolve_backend(backend, self.device).name  # a name: deepcopy-able
        self.fused = fused
        self.nan_guard = nan_guard
        self.capturable = capturable
        self.max_skipped_in_a_row = max_skipped_in_a_row
        # steps refused for non-finite gradients, all and in a row: ints, or 0-d device tensors
        zero = torch.zeros((), dtype=torch.int64, device=self.device) if capturable else 0
        self._skipped, self._skipped_in_a_row = zero, zero.clone() if capturable else 0
        self._hyper = hyper
        budget = plan.budget
        # a global budget allocates from scores: GReg-1 and L1 from the weights now, GReg-2 at its pick
        # (it regularizes every unit the budget may cut until then)
        self._allocates_at_pick = budget is not None and budget.by_score and method == "greg2"
        if capturable:
            self._check_capturable()
        if budget is not None and budget.by_score and method != "greg2":
            allocate(plan, plan_scores(plan, budget.units(plan), penalize))
        self._setup(budget.units(plan) if self._allocates_at_pick else plan.pruned, method)
        frozen = [l.name for l in self.layers
                  if not all(s.param.requires_grad for s in l.slices(plan.module, penalize))]
        if frozen:
            warnings.warn(f"planned layers {frozen[:5]} are frozen (requires_grad=False): they get no "
                          "gradient, so they lose their groups without being regularized", stacklevel=2)
        if method != "greg2":  # GReg-1 and L1 select on the weights as they are
            self.schedule.select(self._map.unit_scores(self.backend.scores(self.slices)))
        if method == "l1" or not self.layers:
            self._prune()

    def _setup(self, units, method: str) -> None:
        """The slices, the schedule and the fused-step bookkeeping for regularizing ``units``."""
        plan = self.plan
        self._map = SliceMap(units, plan.module, self.penalize, self.device, whole=self.fused,
                             cache=not self.capturable)
        self._removed = None  # after pruning: (tensor, removed entries) whose gradients stay zero
        self.slices = self._map.slices
        self._backend_memo: dict = {}  # host work a backend reuses across steps (triton: its launches)
        self.layers = list(units)
        self._check_optimizer()
        if self.fused:
            optimizer = self.optimizer
            group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            self._fused_groups = [group_of[id(s.param)] for s in self.slices]
            self._check_fusable()
            fused_ids = {id(s.param) for s in self.slices}
            self._others = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in fused_ids]
            if self.capturable:
                self._others_optimizer = torch.optim.SGD(
                    [{**g, "params": [p for p in g["params"] if id(p) not in fused_ids]} for g in optimizer.param_groups])
                self._others_optimizer.state = optimizer.state
        self.schedule = (DeviceSchedule if self.capturable else Schedule)(
            self.layers, method, self._hyper, self.device,
            allocate=self._allocate_at_pick if self._allocates_at_pick else None)
        if self.capturable:
            self._setup_capturable()

    def _allocate_at_pick(self, scores: list[torch.Tensor]) -> None:
        """GReg-2 with a global budget: the counts from the scores of all units at the pick."""
        allocate(self.plan, dict(zip((l.name for l in self.layers), scores)))

    # ---- the torch.optim surface, passed through to the inner optimizer ----
    def _init_optimizer_hooks(self) -> None:
        """What ``Optimizer.__init__`` sets up besides the parameters (which stay the inner
        optimizer's): hook registries and the step wrapper that runs step pre/post hooks."""
        for registry in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                         "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                         "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, registry, OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    def __getstate__(self) -> dict:
        # everything (Optimizer's keeps only its own three fields), except the step wrapper an
        # LR scheduler puts on the instance: it is bound to this object, not to a copy
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def backend(self) -> ModuleType:
        return backend_module(self._backend_name)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (f"GrowingReg(method={self.method}, phase={self.phase}, iteration={self.iteration}, "
                f"layers={len(self.layers)}, backend={self.backend.name}, optimizer={type(self.optimizer).__name__})")

    # ---- the schedule, as the user sees it ----
    @property
    def method(self) -> str:
        return self.schedule.method

    @property
    def hyper(self) -> dict:
        return self.schedule.hyper

    @property
    def phase(self) -> str:
        return self.schedule.phase

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
        if self.capturable:
            return self._capturable_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nan_guard and not grads_finite(self.optimizer):
            self._skipped += 1  # nothing reaches λ, the schedule or the weights
            self._skipped_in_a_row += 1
            self.check()
            return loss
        self._skipped_in_a_row = 0
        if self.fused:
            self._regularize(fused=True)
            self._step_others()
        elif closure is not None and _needs_closure(self.optimizer):
            self.apply_penalty()
            self.optimizer.step(self._penalized(closure))
        else:
            self.apply_penalty()
            self.optimizer.step()
        if self.schedule.advance():
            self._prune()
        return loss

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

    # ---- a capturable step: no host sync, every decision a tensor op ----
    def _check_capturable(self) -> None:
        """Refuse what a capturable step cannot run without reading the device, with what to change."""
        opt = self.optimizer
        if _needs_closure(opt):
            raise ValueError(f"capturable=True cannot wrap {type(opt).__name__}: its step re-evaluates a closure "
                             "on the host; use capturable=False")
        if self.nan_guard and not isinstance(opt, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(f"capturable=True with nan_guard=True skips a non-finite step on the device, which "
                             f"needs an inner optimizer whose fresh state is zeros (SGD, Adam, AdamW), not "
                             f"{type(opt).__name__}: pass nan_guard=False (e.g. under a GradScaler, which guards itself)")
        if self.nan_guard and isinstance(opt, torch.optim.SGD) and any(
                g["momentum"] and g["dampening"] for g in opt.param_groups):
            raise ValueError("capturable=True with nan_guard=True starts SGD's momentum from zeros, exact only "
                             "without dampening: pass dampening=0 or nan_guard=False")
        if self.device.type == "cuda":
            slow = [i for i, g in enumerate(opt.param_groups) if g.get("capturable") is False and not g.get("fused")]
            if slow:
                raise ValueError(f"capturable=True on CUDA needs a capturable inner optimizer: param group {slow[0]} "
                                 f"of {type(opt).__name__} has capturable=False (pass capturable=True or fused=True)")

    def _setup_capturable(self) -> None:
        """Device-side constants and the lists a capturable step walks (shapes fixed, masks not)."""
        members = [masked_tensors(self.plan, l, k) for l, k in zip(self.layers, self.schedule.kept)]
        elsewhere = sorted({f"{t.device}" for pairs in members for t, _ in pairs} - {str(self.device)})
        if elsewhere:
            raise ValueError(f"capturable=True keeps the masks on {self.device}, but tensors the pruning zeroes are "
                             f"on {elsewhere}: move the whole model to one device")
        penalized = {id(s.param) for s in self.slices}
        # per layer, which of its masked tensors get their removed gradients zeroed (the pass does the rest)
        self._grad_members = [[l.granularity != "weight" and id(t) not in penalized for t, _ in pairs]
                              for l, pairs in zip(self.layers, members)]
        self._all_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._map.kept(self.schedule.kept, self.schedule.version)  # its in-place buffers, before any compile
        if hasattr(self.backend, "capture"):  # what the backend's op needs registered before a compile
            self.backend.capture(self.slices, self._backend_memo)
        if self.nan_guard:  # fused SGD skipped on its first step leaves its new momentum buffer unset (torch
            for group in self.optimizer.param_groups:  # 2.14): start from zeros, exact (0 * m + d = d)
                if isinstance(self.optimizer, torch.optim.SGD) and group["momentum"] != 0:
                    for p in group["params"]:
                        self.optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))

    def _capturable_step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ok = finite_grads(self.optimizer) if self.nan_guard else None
        ok = self._all_finite if ok is None else ok
        skip = ~ok
        s = self.schedule
        with torch.no_grad():
            update, pick_now, mask = s.device_begin(ok)
            sgd = self._sgd_args(skip) if self.fused else None
            scores = self.backend.step(self._batch(sgd), want_scores=True, mask=mask)
            self._zero_removed_grads(mask)
            s.device_end(self._map.unit_scores(scores), update, pick_now)
        if self.fused:
            self._step_others(skip)
        else:
            self._inner_step(skip)
        with torch.no_grad():
            self._zero_pruned(s.device_advance(ok))
            self._skipped += skip
            self._skipped_in_a_row.copy_(torch.where(ok, 0, self._skipped_in_a_row + 1))
        return loss

    def _inner_step(self, skip: torch.Tensor | None = None, opt: torch.optim.Optimizer | None = None) -> None:
        """The inner optimizer's step. Under a capturable nan guard (``skip``, a 0-d flag) it is
        skipped on the device: torch's fused optimizers take it as ``found_inf`` (as under a
        GradScaler); any other is stepped, then its parameters and state are put back where
        ``skip`` is set (two more passes over them: fused=True avoids those). State that a skipped
        step created starts from zeros, the fresh state of SGD (dampening 0), Adam and AdamW."""
        opt = opt or self.optimizer
        if not self.capturable:
            opt.step()
            return
        # torch's step wrapper breaks the graph by design (torch.optim.optimizer._use_grad): a compiled
        # step calls the step itself, under no_grad as that wrapper would
        step = _unwrapped_step(opt) if torch.compiler.is_compiling() else opt.step
        if skip is None or not self.nan_guard:
            with torch.no_grad():
                step()
            return
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        had_state = [bool(opt.state.get(p)) for p in params]
        found_inf = all(g.get("fused") for g in opt.param_groups)
        saved = [] if found_inf else [[t.clone() for t in _state_tensors(opt, p, with_param=True)]
                                      for p, had in zip(params, had_state)]
        with torch.no_grad():
            if found_inf:
                opt.grad_scale, opt.found_inf = None, skip.to(torch.float32)
            try:
                step()
            finally:
                if found_inf:
                    del opt.grad_scale, opt.found_inf
            for i, (p, had) in enumerate(zip(params, had_state)):
                restored = [] if found_inf else _state_tensors(opt, p, with_param=True)[:len(saved[i])]
                for t, before in zip(restored, saved[i] if saved else ()):
                    t.copy_(torch.where(skip, before, t))
                if not had:  # made by this step: fresh, unless the step counted
                    for t in _state_tensors(opt, p, with_param=False):
                        t.copy_(torch.where(skip, torch.zeros_like(t), t))

    def _penalized(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` whose every evaluation also carries this step's penalty (λ fixed)."""
        def evaluate():
            with torch.enable_grad():
                loss = closure()
            with torch.no_grad():
                self.backend.step(self._batch(), want_scores=False, mask=self.done)
                lams = self._map.by_channel(self.schedule.group_lambdas(as_applied=True), filler=0.0)
                energy = sum(0.5 * (expand_groups(s, lam) * s.weight.detach().square()).sum()
                             for s, lam in zip(self.slices, lams))
            return loss + energy if loss is not None else loss
        return evaluate

    def _batch(self, sgd: SGDArgs | None = None) -> StepBatch:
        s, m = self.schedule, self._map
        kept = m.kept(s.kept, s.version)
        lam_kept, lam_selected = m.per_slice(s.lam_kept32), m.per_slice(s.lam_selected32)
        # no cross tables under a capturable schedule: its steps always score while they may mask,
        # which runs the passes one after the other (see greg_fast.backend.triton)
        cross = m.cross(kept, lam_kept, lam_selected) if sgd is None and not self.capturable else None
        return StepBatch(self.slices, kept, lam_kept, lam_selected, sgd, passes=m.passes, cross=cross,
                         memo=self._backend_memo)

    def apply_penalty(self) -> None:
        """Update λ when due, then ``grad += λ_g * w`` (once pruned: zero the removed groups'
        weights and gradients instead)."""
        self._regularize(fused=False)

    @torch.no_grad()
    def _regularize(self, fused: bool) -> None:
        """One pass over the regularized weights, penalty (and with ``fused`` the SGD update), with
        the λ update split around it: the λ of this step does not depend on this step's scores
        (increments come first, the pick happens while λ is uniform), so one pass serves both."""
        done = self.done
        update, pick_now = self.schedule.begin_step()
        sgd = self._sgd_args() if fused else None
        scores = self.backend.step(self._batch(sgd), want_scores=self.schedule.wants_scores(update, pick_now),
                                   mask=done)
        if done:
            self._zero_removed_grads()
        if update:
            self.schedule.end_step(self._map.unit_scores(scores) if scores is not None else scores, pick_now)

    def _sgd_args(self, skip: torch.Tensor | bool = False) -> SGDArgs:
        groups = self._fused_groups
        return SGDArgs(buffers=[self._momentum_buffer(s, g) for s, g in zip(self.slices, groups)],
                       lr=[g["lr"] for g in groups], momentum=[g["momentum"] for g in groups],
                       weight_decay=[g["weight_decay"] for g in groups], skip=skip)

    # ---- after pruning: removed groups stay exactly zero ----
    def _prune(self) -> None:
        """Zero the removed groups in the weights, biases, following BatchNorms and in every
        optimizer state tensor shaped like them, so that SGD (momentum, weight decay), Adam and
        AdamW leave those entries at zero; the backend's masked pass keeps them there."""
        self.schedule.finish()
        with torch.no_grad():
            self._zero_pruned()

    def _zero_pruned(self, now: torch.Tensor | None = None) -> None:
        """The zeroing of :meth:`_prune`; with ``now`` (a capturable step's 0-d flag) a masked write
        that zeroes only when it is set."""
        for layer, kept in zip(self.layers, self.schedule.kept):
            for tensor, keep in masked_tensors(self.plan, layer, kept):
                removed = ~keep if now is None else ~keep & now
                tensor.masked_fill_(removed, 0)
                for value in self.optimizer.state.get(tensor, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                        value.masked_fill_(removed, 0)

    def _zero_removed_grads(self, mask: torch.Tensor | None = None) -> None:
        """Every step after pruning: the removed groups' gradients of biases, BatchNorms and the
        other zeroed members (the backend's masked pass does the penalized weights). A capturable
        step calls it every step with its 0-d ``mask`` flag (masks may change on the device)."""
        if mask is not None:
            for layer, kept, chosen in zip(self.layers, self.schedule.kept, self._grad_members):
                for (tensor, keep), take in zip(masked_tensors(self.plan, layer, kept), chosen):
                    if take and tensor.grad is not None:
                        tensor.grad.masked_fill_(~keep & mask, 0)
            return
        if self._removed is None:  # the masks no longer change: build the list once
            penalized = {id(s.param) for s in self.slices}
            self._removed = [(t, ~keep) for layer, kept in zip(self.layers, self.schedule.kept)
                             if layer.granularity != "weight"
                             for t, keep in masked_tensors(self.plan, layer, kept) if id(t) not in penalized]
        for tensor, removed in self._removed:
            if tensor.grad is not None:
                tensor.grad.masked_fill_(removed, 0)

    # ---- views of the state ----
    def state_bytes(self) -> int:
        """Bytes the schedule keeps on the device besides the optimizer (see Schedule.state_bytes)."""
        return self.schedule.state_bytes()

    def masks(self) -> dict[str, torch.Tensor]:
        """``{layer: bool mask}``, True = kept, for every planned layer (all True where nothing is
        selected yet or nothing is pruned): ``[n_groups]`` for filters and channels, the weight's
        shape for unstructured layers (so that ``weight * mask`` is the pruned weight)."""
        def shaped(layer, kept):
            return kept.view(layer.weight.shape) if layer.granularity == "weight" else kept
        kept = dict(zip((l.name for l in self.layers), self.schedule.kept))
        return {l.name: shaped(l, kept_bool(l, kept[l.name]).clone() if l.name in kept else
                               torch.ones(l.n_groups, dtype=torch.bool, device=self.device))
                for l in self.plan.layers}

    def penalties(self) -> dict[str, torch.Tensor]:
        """Current λ per group, ``{layer: float64 [n_groups]}``, for the regularized layers."""
        return self.schedule.penalties()

    def lambdas(self) -> dict[str, tuple[float, float]]:
        """``{layer: (λ selected, λ kept)}`` as Python floats (one host sync)."""
        return self.schedule.lambdas()

    def scores(self) -> dict[str, torch.Tensor]:
        """Per-group scores (mean |w|) computed at the latest λ update (now, if none yet)."""
        last = self.schedule.last_scores
        if not self.schedule.structured or any(s is None for s in last):
            last = self._map.unit_scores(self.backend.scores(self.slices))
        return dict(zip((l.name for l in self.layers), last))

    def current_scores(self, name: str) -> torch.Tensor:
        """One regularized unit's per-group scores (mean |w| of what it penalizes), computed now."""
        i = next(i for i, l in enumerate(self.layers) if l.name == name)
        return self._map.unit_scores_of(i, self.backend.scores)

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
        self._removed = None
        if self.capturable:  # in place: a captured graph holds these tensors
            self._skipped.fill_(g.get("skipped_steps", 0))
            self._skipped_in_a_row.zero_()
        else:
            self._skipped = g.get("skipped_steps", 0)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_fusable(self) -> None:
        if type(self.optimizer) is not torch.optim.SGD:
            raise ValueError(f"fused=True needs a torch.optim.SGD inner optimizer, got {type(self.optimizer).__name__}")
        rows: dict[int, int] = {}
        for s in self.slices:  # the fused update must visit every entry of a parameter exactly once
            covers = s.param.shape[0] if not isinstance(s, Slice) else s.n_groups if s.axis == 0 else -1
            rows[id(s.param)] = rows.get(id(s.param), 0) + covers
        partial = [s.name for s in self.slices if rows[id(s.param)] != s.param.shape[0]]
        if partial:
            raise ValueError(f"fused=True updates each parameter entry once, but penalize={self.penalize!r} "
                             f"regularizes {partial[0]} through overlapping slices (rows and columns); use "
                             "fused=False")
        for part, g in zip(self.slices, self._fused_groups):
            bad = [k for k, ok in (("dampening", g["dampening"] == 0), ("nesterov", not g["nesterov"]),
                                   ("maximize", not g["maximize"])) if not ok]
            if bad:
                raise ValueError(f"fused=True supports SGD without {', '.join(bad)} "
                                 f"(the param group of {part.name!r} sets them)")

    def _momentum_buffer(self, part, group: dict) -> torch.Tensor | None:
        """SGD's own buffer, the slice's part of it (a zero start equals SGD's copy-on-first-step:
        0 * m + d = d)."""
        if group["momentum"] == 0:
            return None
        weight = part.param
        state = self.optimizer.state[weight]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
        return part.part(buf)

    def _step_others(self, skip: torch.Tensor | None = None) -> None:
        """The inner SGD steps every parameter but the fused weights (SGD skips a None grad). A
        capturable step uses a sibling SGD over the others instead, sharing the inner optimizer's
        settings and state (a compiled optimizer step refuses parameters whose grad was just unset)."""
        if all(p.grad is None for p in self._others):
            return
        if self.capturable:
            sibling = self._others_optimizer
            if sibling.state is not self.optimizer.state:  # load_state_dict swaps the inner optimizer's dict
                sibling.state = self.optimizer.state
            for mine, theirs in zip(sibling.param_groups, self.optimizer.param_groups):
                mine.update((k, v) for k, v in theirs.items() if k != "params")  # an LR scheduler's changes
            self._inner_step(skip, sibling)
            return
        grads = list({id(s.param): (s.param, s.param.grad) for s in self.slices}.values())
        for w, _ in grads:
            w.grad = None
        try:
            self._inner_step(skip)
        finally:
            for w, g in grads:
                w.grad = g

    def _check_optimizer(self) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [s.name for s in self.slices if id(s.param) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the weights of planned layers {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}; build it from model.parameters()")


