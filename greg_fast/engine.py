"""GrowingReg: GReg-1, GReg-2 and one-shot L1 as a wrapper around any torch.optim optimizer.

Schedule state is tiny and exact. λ takes at most two values per layer, so a layer holds a kept
mask over its groups plus integer counts: ``n_pick`` penalty increments of ``pick_delta`` (GReg-2's
uniform phase, the same for every layer) and ``n_grow[i]`` increments of ``delta``. Then

    λ_selected = n_pick * pick_delta + n_grow * delta
    λ_kept     = 0 (GReg-1) | n_pick * pick_delta until the first post-pick increment, then ``recover`` (GReg-2)

computed in float64 on the parameters' device, so "λ after k updates is k * delta" holds without
accumulated rounding and a resumed run continues bit for bit.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from types import ModuleType
from typing import Any, Callable

import torch

from .backend import SGDArgs, StepBatch, module as backend_module, resolve as resolve_backend
from .hyper import Hyper
from .masks import expand_groups, kept_bool, masked_tensors, pack_bits
from .plan import Plan
from .train import grads_finite

PHASES = ("pick", "grow", "stabilize", "done")
_SMOOTHING = 0.9  # h = 0.9 h + 0.1 ratio, as in the reference


def _reached(value: float, threshold: float) -> bool:
    """value >= threshold, forgiving float products (1000 * 1e-5 vs 1e-2)."""
    return value >= threshold * (1 - 1e-9) if threshold > 0 else value >= threshold


def _from_rank0(*tensors: torch.Tensor) -> None:
    """Under torch.distributed, make every rank hold rank 0's decisions (selections, finished
    layers, smoothed ratios): identical by construction, guaranteed regardless of rounding."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for t in tensors:
        wire = t.to(torch.uint8) if t.dtype == torch.bool else t  # not every backend sends bool
        torch.distributed.broadcast(wire, src=0)
        if wire is not t:
            t.copy_(wire.bool())


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step takes its closure as a required argument (LBFGS)."""
    param = inspect.signature(optimizer.step).parameters.get("closure")
    return param is not None and param.default is inspect.Parameter.empty


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

    ``step(closure)`` evaluates the closure once for the schedule; an inner optimizer that needs
    the closure itself (LBFGS) gets one that adds the penalty to every re-evaluation (gradient
    ``λ_g·w`` and loss ``½ Σ λ_g ‖w_g‖²``).

    ``step()`` after ``loss.backward()``: :meth:`apply_penalty` (λ update every ``interval``
    iterations, then ``grad += λ_g * w``; after pruning, zero the removed groups' gradients), the
    inner optimizer's step, then the schedule advances. Phases: ``pick`` (GReg-2 only), ``grow``,
    ``stabilize``, ``done``. At ``done`` the removed groups are zeroed (weights, biases, following
    BatchNorms and the optimizer state of those entries) and stay zero while training goes on:
    the fine-tune of the reference, masks kept.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: Plan, *, method: str = "greg1",
                 backend: str = "auto", fused: bool = False, nan_guard: bool = True,
                 max_skipped_in_a_row: int = 100, **settings):
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
        frozen = [l.name for l in plan.pruned if not l.weight.requires_grad]
        if frozen:
            warnings.warn(f"planned layers {frozen[:5]} are frozen (requires_grad=False): they get no "
                          "gradient, so they lose their groups without being regularized", stacklevel=2)
        self.optimizer = optimizer
        self.plan = plan
        self.method = method
        self.hyper = hyper.as_dict()
        self.layers = plan.pruned
        self._check_optimizer()
        devices = {l.weight.device for l in plan.layers}
        if len(devices) > 1:
            raise ValueError(f"the planned layers are on several devices {sorted(map(str, devices))}; "
                             "GrowingReg keeps its state on one device")
        self.device = devices.pop() if devices else torch.device("cpu")
        self._backend_name = resolve_backend(backend, self.device).name  # a name: deepcopy-able
        self.fused = fused
        self.nan_guard = nan_guard
        self.skipped_steps = 0  # steps refused for non-finite gradients
        self.max_skipped_in_a_row = max_skipped_in_a_row
        self._skipped_in_a_row = 0
        if fused:
            group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            self._fused_groups = [group_of[id(l.weight)] for l in self.layers]
            self._check_fusable()
            fused_ids = {id(l.weight) for l in self.layers}
            self._others = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in fused_ids]
        self._structured = plan.layers[0].granularity != "weight" if plan.layers else True

        n, dev = len(self.layers), self.device
        # all kept masks are views of one flat buffer, so that cross-layer reductions are single ops;
        # unstructured layers keep theirs bit-packed: one bit per weight
        sizes = [l.n_groups for l in self.layers]
        if self._structured:
            self._kept_flat = torch.ones(sum(sizes), dtype=torch.bool, device=dev)
            self._kept = list(self._kept_flat.split(sizes))
        else:
            packed = [-(-g // 8) for g in sizes]  # bytes of each layer's bits
            self._kept_flat = torch.full((sum(packed),), 255, dtype=torch.uint8, device=dev)
            self._kept = list(self._kept_flat.split(packed))
        # layer index of every group, for the magnitude ratios (structured layers only)
        self._segment = torch.repeat_interleave(torch.arange(n, device=dev), torch.tensor(
            sizes if self._structured else [0] * n, dtype=torch.int64, device=dev))
        self._n_grow = torch.zeros(n, dtype=torch.int64, device=dev)
        self._finished = torch.zeros(n, dtype=torch.bool, device=dev)
        self._hist = torch.full((n,), math.nan, dtype=torch.float64, device=dev)
        self._scores: list[torch.Tensor | None] = [None] * n
        self.iteration = 0           # completed steps
        self._n_pick = 0             # GReg-2 uniform increments (identical for all layers)
        self._picked = method != "greg2"
        self._stabilize_end: int | None = None  # iteration at which the phase becomes "done"
        self._phase = "pick" if method == "greg2" else "grow"
        self._refresh_lambdas()
        if method != "greg2":
            self._select(range(n), self.backend.scores(self.layers))
        if method == "l1" or n == 0:
            self._prune()

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

    # ---- schedule ----
    @property
    def phase(self) -> str:
        return self._phase

    @property
    def done(self) -> bool:
        return self._phase == "done"

    def step(self, closure: Callable[[], Any] | None = None):
        self.plan.check_current()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nan_guard and not grads_finite(self.optimizer):
            self.skipped_steps += 1  # nothing reaches λ, the schedule or the weights
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row >= self.max_skipped_in_a_row:
                raise RuntimeError(
                    f"{self._skipped_in_a_row} steps in a row had non-finite gradients and were skipped, so "
                    "the schedule cannot advance: training has diverged (lower the learning rate or delta, "
                    "or raise max_skipped_in_a_row)")
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
        self.iteration += 1
        if self._phase == "stabilize" and self.iteration >= self._stabilize_end:
            self._prune()
        return loss

    def _penalized(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` whose every evaluation also carries this step's penalty (λ fixed)."""
        def evaluate():
            with torch.enable_grad():
                loss = closure()
            with torch.no_grad():
                self.backend.step(self._batch(), want_scores=False, mask=self._phase == "done")
                lam = [torch.where(kept_bool(l, k), self._lam_kept32[i], self._lam_selected32[i])
                       for i, (l, k) in enumerate(zip(self.layers, self._kept))]
                energy = sum(0.5 * (expand_groups(l, g) * l.weight.detach().square()).sum()
                             for l, g in zip(self.layers, lam))
            return loss + energy if loss is not None else loss
        return evaluate

    def _batch(self, sgd: SGDArgs | None = None) -> StepBatch:
        return StepBatch(self.layers, self._kept, self._lam_kept32, self._lam_selected32, sgd)

    def apply_penalty(self) -> None:
        """Update λ when due, then ``grad += λ_g * w`` (once pruned: zero the removed groups'
        weights and gradients instead)."""
        self._regularize(fused=False)

    @torch.no_grad()
    def _regularize(self, fused: bool) -> None:
        """One pass over the regularized weights, penalty (and with ``fused`` the SGD update), with
        the λ update split around it: the λ of this step does not depend on this step's scores
        (increments come first, the pick happens while λ is uniform), so one pass serves both."""
        done = self._phase == "done"
        update = self._phase in ("pick", "grow") and self.iteration % self.hyper["interval"] == 0
        pick_now = self._advance_counts() if update else False
        # per-weight scores only when a pick needs them: kept they would cost 32 bits per weight
        want_scores = update and (self._structured or pick_now)
        sgd = None
        if fused:
            groups = self._fused_groups
            sgd = SGDArgs(buffers=[self._momentum_buffer(l.weight, g) for l, g in zip(self.layers, groups)],
                          lr=[g["lr"] for g in groups], momentum=[g["momentum"] for g in groups],
                          weight_decay=[g["weight_decay"] for g in groups])
        scores = self.backend.step(self._batch(sgd), want_scores=want_scores, mask=done)
        if done:
            self._zero_removed(grads=True)
        if update:
            self._decide(scores, pick_now)

    def _advance_counts(self) -> bool:
        """The score-independent half of a λ update; True when GReg-2 picks at this update."""
        pick_now = False
        if not self._picked:
            self._n_pick += 1
            if _reached(self._n_pick * self.hyper["pick_delta"], self.hyper["pick_ceiling"]):
                self._picked, self._phase, pick_now = True, "grow", True
        else:
            self._n_grow += ~self._finished
        self._refresh_lambdas()
        return pick_now

    def _decide(self, scores: list[torch.Tensor], pick_now: bool) -> None:
        """The score-dependent half: picks, magnitude ratios, finishing; one host sync."""
        h = self.hyper
        if self._structured:
            self._scores = scores
        if pick_now:
            self._select(range(len(self.layers)), scores)  # on the current weights
        if not self._picked:
            return
        active = ~self._finished
        over_ceiling = torch.maximum(self._lam_selected, self._lam_kept) > h["ceiling"]
        if self._structured:
            ratio = self._magnitude_ratios(scores)
            smoothed = torch.where(self._hist.isnan(), ratio, _SMOOTHING * self._hist + (1 - _SMOOTHING) * ratio)
            self._hist = torch.where(active, smoothed, self._hist)
            strong = self._hist >= h["mag_ratio_limit"]
            if self.method == "greg1":  # GReg-1 stops on the ratio of every pruned layer
                strong = strong.all().expand_as(strong)
            finish = over_ceiling | strong
        else:  # too costly per element in the reference, and not part of the method there
            finish = over_ceiling
        self._finished |= active & finish
        _from_rank0(self._finished, self._hist)
        if bool(self._finished.all()):
            self._phase = "stabilize"
            self._stabilize_end = self.iteration + h["stabilize"] + 1

    def _magnitude_ratios(self, scores: list[torch.Tensor]) -> torch.Tensor:
        """Mean score of kept groups / mean score of removed groups, every layer at once
        (float64 segment sums over the flat score and mask buffers; no host sync)."""
        s = torch.cat(scores).to(torch.float64)
        k = self._kept_flat.to(torch.float64)
        sums = torch.zeros(4, len(self.layers), dtype=torch.float64, device=s.device)
        for row, values in enumerate((s * k, k, s * (1 - k), 1 - k)):
            sums[row].index_add_(0, self._segment, values)
        return (sums[0] / sums[1]) / (sums[2] / sums[3])

    def _refresh_lambdas(self) -> None:
        h = self.hyper
        pick = self._n_pick * h["pick_delta"]
        self._lam_selected = pick + self._n_grow.to(torch.float64) * h["delta"]
        if self.method == "greg2":
            self._lam_kept = torch.where(self._n_grow > 0, torch.full_like(self._lam_selected, h["recover"]),
                                         torch.full_like(self._lam_selected, pick))
        else:
            self._lam_kept = torch.zeros_like(self._lam_selected)
        # the kernels take fp32 λ; after pruning there is no penalty
        done = self._phase == "done"
        self._lam_selected32 = torch.zeros_like(self._lam_selected, dtype=torch.float32) if done else \
            self._lam_selected.float()
        self._lam_kept32 = torch.zeros_like(self._lam_kept, dtype=torch.float32) if done else self._lam_kept.float()

    def _select(self, indices, scores) -> None:
        """Each layer drops its ``n_prune`` lowest-score groups (ties: lowest index first)."""
        for i in indices:
            order = torch.sort(scores[i], stable=True).indices
            kept = torch.ones(self.layers[i].n_groups, dtype=torch.bool, device=self.device)
            kept[order[: self.layers[i].n_prune]] = False
            self._kept[i].copy_(kept if self._structured else pack_bits(kept))
        _from_rank0(self._kept_flat)

    def _prune(self) -> None:
        self._phase = "done"
        self._refresh_lambdas()
        self._zero_removed(grads=False)

    @torch.no_grad()
    def _zero_removed(self, grads: bool) -> None:
        """Zero removed groups: in the gradients of biases and BatchNorms every step after pruning
        (the backend's masked pass does the weights), or once at pruning in the weights and in every
        optimizer state tensor shaped like them, so that SGD (momentum, weight decay), Adam and
        AdamW leave those entries exactly zero."""
        for layer, kept in zip(self.layers, self._kept):
            if grads and layer.granularity == "weight":
                continue  # nothing but the weight, which the backend has masked
            for tensor, keep in masked_tensors(self.plan, layer, kept):
                if grads and tensor is layer.weight:
                    continue
                if grads:
                    if tensor.grad is not None:
                        tensor.grad.masked_fill_(~keep, 0)
                    continue
                tensor.masked_fill_(~keep, 0)
                for value in self.optimizer.state.get(tensor, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                        value.masked_fill_(~keep, 0)

    def state_bytes(self) -> int:
        """Bytes the schedule keeps on the device besides the optimizer: masks (a bool per group,
        or a bit per weight for unstructured layers), per-layer counts, ratios and λ, and the
        latest group scores of structured layers."""
        tensors = [self._kept_flat, self._n_grow, self._finished, self._hist, self._segment,
                   self._lam_selected, self._lam_kept, self._lam_selected32, self._lam_kept32]
        tensors += [s for s in self._scores if s is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- views of the state ----
    def masks(self) -> dict[str, torch.Tensor]:
        """``{layer: bool mask}``, True = kept, for every planned layer (all True where nothing is
        selected yet or nothing is pruned): ``[n_groups]`` for filters and channels, the weight's
        shape for unstructured layers (so that ``weight * mask`` is the pruned weight)."""
        def shaped(layer, kept):
            return kept.view(layer.weight.shape) if layer.granularity == "weight" else kept
        kept = dict(zip((l.name for l in self.layers), self._kept))
        return {l.name: shaped(l, kept_bool(l, kept[l.name]).clone() if l.name in kept else
                               torch.ones(l.n_groups, dtype=torch.bool, device=self.device))
                for l in self.plan.layers}

    def penalties(self) -> dict[str, torch.Tensor]:
        """Current λ per group, ``{layer: float64 [n_groups]}``, for the regularized layers."""
        return {l.name: torch.where(kept_bool(l, k), self._lam_kept[i], self._lam_selected[i])
                for i, (l, k) in enumerate(zip(self.layers, self._kept))}

    def lambdas(self) -> dict[str, tuple[float, float]]:
        """``{layer: (λ selected, λ kept)}`` as Python floats (one host sync)."""
        sel, kept = self._lam_selected.tolist(), self._lam_kept.tolist()
        return {l.name: (s, k) for l, s, k in zip(self.layers, sel, kept)}

    def scores(self) -> dict[str, torch.Tensor]:
        """Per-group scores (mean |w|) computed at the latest λ update (now, if none yet)."""
        if not self._structured or any(s is None for s in self._scores):
            return dict(zip((l.name for l in self.layers), self.backend.scores(self.layers)))
        return dict(zip((l.name for l in self.layers), self._scores))

    def magnitude_ratios(self) -> dict[str, float]:
        """Smoothed magnitude ratio (mean kept score / mean removed score) per layer, NaN before any."""
        return dict(zip((l.name for l in self.layers), self._hist.tolist()))

    # ---- checkpointing ----
    def state_dict(self) -> dict:
        """Inner optimizer state and the whole schedule; loads with ``torch.load(weights_only=True)``.
        State-dict hooks registered on this wrapper run as on any optimizer."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = self._state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            state = hook(self, state) or state
        return state

    def _state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "greg": {
                "method": self.method, "hyper": dict(self.hyper), "phase": self._phase,
                "layers": [l.name for l in self.layers], "n_groups": [l.n_groups for l in self.layers],
                "n_prune": [l.n_prune for l in self.layers], "granularity": [l.granularity for l in self.layers],
                "iteration": self.iteration, "n_pick": self._n_pick,
                "skipped_steps": self.skipped_steps,
                "picked": self._picked, "stabilize_end": self._stabilize_end,
                "n_grow": self._n_grow.clone(), "finished": self._finished.clone(), "hist": self._hist.clone(),
                "kept": [k.clone() for k in self._kept],
                "scores": [s.clone() if s is not None else None for s in self._scores],
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        self._load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_state_dict(self, state_dict: dict) -> None:
        try:
            g = state_dict["greg"]
            opt = state_dict["optimizer"]
        except (KeyError, TypeError) as err:
            raise ValueError("not a GrowingReg state_dict (expected keys 'optimizer' and 'greg')") from err
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
        dev = self.device
        kept = [k.to(dev) for k in g["kept"]]
        if [(k.dtype, k.shape) for k in kept] != [(v.dtype, v.shape) for v in self._kept]:
            raise ValueError("checkpoint masks do not match this plan's layers")
        for layer, k in zip(self.layers, kept):  # a selection removes exactly n_prune groups
            removed = layer.n_groups - int(kept_bool(layer, k).sum())
            if removed not in (0, layer.n_prune) or (removed == 0 and g["picked"] and layer.n_prune):
                raise ValueError(f"checkpoint mask of {layer.name!r} removes {removed} groups, this plan "
                                 f"prunes {layer.n_prune}: it was saved for a plan with other ratios")
        self.optimizer.load_state_dict(opt)
        self._phase, self.iteration = g["phase"], g["iteration"]
        self._n_pick, self._picked, self._stabilize_end = g["n_pick"], g["picked"], g["stabilize_end"]
        self.skipped_steps = g.get("skipped_steps", 0)
        self._n_grow = g["n_grow"].to(dev, torch.int64)
        self._finished = g["finished"].to(dev, torch.bool)
        self._hist = g["hist"].to(dev, torch.float64)
        for view, k in zip(self._kept, kept):
            view.copy_(k)
        self._scores = [s.to(dev) if s is not None else None for s in g["scores"]]
        self._refresh_lambdas()

    def _check_fusable(self) -> None:
        if type(self.optimizer) is not torch.optim.SGD:
            raise ValueError(f"fused=True needs a torch.optim.SGD inner optimizer, got {type(self.optimizer).__name__}")
        for layer, g in zip(self.layers, self._fused_groups):
            bad = [k for k, ok in (("dampening", g["dampening"] == 0), ("nesterov", not g["nesterov"]),
                                   ("maximize", not g["maximize"])) if not ok]
            if bad:
                raise ValueError(f"fused=True supports SGD without {', '.join(bad)} "
                                 f"(the param group of {layer.name!r} sets them)")

    def _momentum_buffer(self, weight: torch.Tensor, group: dict) -> torch.Tensor | None:
        """SGD's own buffer (a zero start equals SGD's copy-on-first-step: 0 * m + d = d)."""
        if group["momentum"] == 0:
            return None
        state = self.optimizer.state[weight]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
        return buf

    def _step_others(self) -> None:
        """The inner SGD steps every parameter but the fused weights (SGD skips a None grad)."""
        if all(p.grad is None for p in self._others):
            return
        grads = [(l.weight, l.weight.grad) for l in self.layers]
        for w, _ in grads:
            w.grad = None
        try:
            self.optimizer.step()
        finally:
            for w, g in grads:
                w.grad = g

    def _check_optimizer(self) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [l.name for l in self.layers if id(l.weight) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the weights of planned layers {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}; build it from model.parameters()")


