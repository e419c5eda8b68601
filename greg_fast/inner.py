"""The inner optimizer under GrowingReg: how its step is taken, chosen once at construction.

:class:`InnerStep` steps the wrapped optimizer itself; :class:`FusedSGDStep` (``fused=True``) hands
the SGD update of the regularized weights to the backend's pass (:meth:`sgd_args`) and steps every
other parameter. Under a capturable schedule a step the NaN guard refuses is skipped on the device
(:func:`skippable_step`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

from .backend import SGDArgs
from .refusals import check_fusable, needs_closure


def unwrapped_step(optimizer: torch.optim.Optimizer) -> Callable[[], Any]:
    """The optimizer class's own ``step``, without torch's hook and grad-mode wrappers."""
    step = type(optimizer).step
    while hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return lambda: step(optimizer)


def state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor, with_param: bool) -> list[torch.Tensor]:
    """The tensors a step of ``optimizer`` writes for ``param``: its state (and the parameter)."""
    state = [v for v in optimizer.state.get(param, {}).values() if isinstance(v, torch.Tensor)]
    return [param, *state] if with_param else state


def skippable_step(opt: torch.optim.Optimizer, skip: torch.Tensor | None) -> None:
    """A capturable step of ``opt``, skipped on the device where ``skip`` (a 0-d flag) is set:
    torch's fused optimizers take it as ``found_inf`` (as under a GradScaler); any other is stepped,
    then its parameters and state are put back where ``skip`` is set (two more passes over them:
    fused=True avoids those). State that a skipped step created starts from zeros, the fresh state
    of SGD (dampening 0), Adam and AdamW."""
    # torch's step wrapper breaks the graph by design (torch.optim.optimizer._use_grad): a compiled
    # step calls the step itself, under no_grad as that wrapper would
    step = unwrapped_step(opt) if torch.compiler.is_compiling() else opt.step
    if skip is None:
        with torch.no_grad():
            step()
        return
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    had_state = [bool(opt.state.get(p)) for p in params]
    found_inf = all(g.get("fused") for g in opt.param_groups)
    saved = [] if found_inf else [[t.clone() for t in state_tensors(opt, p, with_param=True)] for p in params]
    with torch.no_grad():
        if found_inf:
            opt.grad_scale, opt.found_inf = None, skip.to(torch.float32)
        try:
            step()
        finally:
            if found_inf:
                del opt.grad_scale, opt.found_inf
        for i, (p, had) in enumerate(zip(params, had_state)):
            restored = [] if found_inf else state_tensors(opt, p, with_param=True)[:len(saved[i])]
            for t, before in zip(restored, saved[i] if saved else ()):
                t.copy_(torch.where(skip, before, t))
            if not had:  # made by this step: fresh, unless the step counted
                for t in state_tensors(opt, p, with_param=False):
                    t.copy_(torch.where(skip, torch.zeros_like(t), t))


class InnerStep:
    """Steps the inner optimizer after the penalty pass (``fused=False``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, capturable: bool, nan_guard: bool):
        self.optimizer, self.capturable, self.nan_guard = optimizer, capturable, nan_guard
        self.needs_closure = needs_closure(optimizer)
        if capturable and nan_guard and isinstance(optimizer, torch.optim.SGD):
            # fused SGD skipped on its first step leaves its new momentum buffer unset (torch 2.14):
            # start from zeros, exact (0 * m + d = d)
            for group in optimizer.param_groups:
                if group["momentum"] != 0:
                    for p in group["params"]:
                        optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))

    def sgd_args(self, skip: torch.Tensor | bool = False) -> SGDArgs | None:
        """The SGD half of the backend's pass: none, the inner optimizer updates the weights."""
        return None

    def step(self, skip: torch.Tensor | None = None, closure: Callable[[], Any] | None = None) -> None:
        if not self.capturable:
            self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        else:
            skippable_step(self.optimizer, skip if self.nan_guard else None)


class FusedSGDStep(InnerStep):
    """``fused=True``: the backend's pass takes the regularized weights' whole SGD update (weight
    decay, momentum, the step: one pass over them); the inner SGD steps every other parameter. A
    capturable step uses a sibling SGD over the others instead, sharing the inner optimizer's
    settings and state (a compiled optimizer step refuses parameters whose grad was just unset)."""

    def __init__(self, optimizer: torch.optim.Optimizer, slices: Sequence, *, capturable: bool, nan_guard: bool,
                 penalize: str):
        super().__init__(optimizer, capturable=capturable, nan_guard=nan_guard)
        self.slices = slices
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.groups = [group_of[id(s.param)] for s in slices]
        check_fusable(optimizer, slices, self.groups, penalize)
        fused_ids = {id(s.param) for s in slices}
        self.others = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in fused_ids]
        if capturable:
            self.sibling = torch.optim.SGD(
                [{**g, "params": [p for p in g["params"] if id(p) not in fused_ids]} for g in optimizer.param_groups])
            self.sibling.state = optimizer.state

    def sgd_args(self, skip: torch.Tensor | bool = False) -> SGDArgs:
        groups = self.groups
        return SGDArgs(buffers=[self._momentum_buffer(s, g) for s, g in zip(self.slices, groups)],
                       lr=[g["lr"] for g in groups], momentum=[g["momentum"] for g in groups],
                       weight_decay=[g["weight_decay"] for g in groups], skip=skip)

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

    def step(self, skip: torch.Tensor | None = None, closure: Callable[[], Any] | None = None) -> None:
        """The inner SGD over every parameter but the fused weights (SGD skips a None grad)."""
        if all(p.grad is None for p in self.others):
            return
        if self.capturable:
            sibling = self.sibling
            if sibling.state is not self.optimizer.state:  # load_state_dict swaps the inner optimizer's dict
                sibling.state = self.optimizer.state
            for mine, theirs in zip(sibling.param_groups, self.optimizer.param_groups):
                mine.update((k, v) for k, v in theirs.items() if k != "params")  # an LR scheduler's changes
            skippable_step(sibling, skip if self.nan_guard else None)
            return
        grads = list({id(s.param): (s.param, s.param.grad) for s in self.slices}.values())
        for w, _ in grads:
            w.grad = None
        try:
            self.optimizer.step()
        finally:
            for w, g in grads:
                w.grad = g


class OptimizerWrapper(torch.optim.Optimizer):
    """The torch.optim surface of a wrapper around ``self.optimizer``: parameters, state and
    settings stay the inner optimizer's and pass through; the hook registries and the step wrapper
    (step pre/post hooks, LR schedulers' step counting) are the wrapper's own."""

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
