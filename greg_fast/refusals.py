"""What GrowingReg refuses at construction, each with what to change: the arguments, an inner
optimizer that does not hold the planned weights, a fused step it cannot take, a capturable step
that would need the host."""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from .result import Plan
from .units import PENALIZE, Slice


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step takes its closure as a required argument (LBFGS)."""
    param = inspect.signature(optimizer.step).parameters.get("closure")
    return param is not None and param.default is inspect.Parameter.empty


def check_arguments(optimizer, plan, max_skipped_in_a_row, penalize) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"GrowingReg wraps a torch.optim optimizer, e.g. GrowingReg(torch.optim.SGD("
                        f"model.parameters(), lr=1e-3), plan); got {type(optimizer).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"GrowingReg needs the Plan returned by greg_fast.plan(model, ...), "
                        f"got {type(plan).__name__}")
    plan.check_current()
    if not isinstance(max_skipped_in_a_row, int) or max_skipped_in_a_row < 1:
        raise ValueError(f"max_skipped_in_a_row must be an integer >= 1, got {max_skipped_in_a_row!r}")
    if penalize not in PENALIZE:
        raise ValueError(f"penalize must be one of {PENALIZE}, got {penalize!r}")


def one_device(plan: Plan) -> torch.device:
    """The device of every planned layer (GrowingReg keeps its state there)."""
    devices = {l.weight.device for l in plan.layers}
    if len(devices) > 1:
        raise ValueError(f"the planned layers are on several devices {sorted(map(str, devices))}; "
                         "GrowingReg keeps its state on one device")
    return devices.pop() if devices else torch.device("cpu")


def check_holds(optimizer: torch.optim.Optimizer, slices: Sequence) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [s.name for s in slices if id(s.param) not in held]
    if missing:
        raise ValueError(f"the optimizer does not hold the weights of planned layers {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; build it from model.parameters()")


def check_fusable(optimizer: torch.optim.Optimizer, slices: Sequence, groups: Sequence[dict], penalize: str) -> None:
    if type(optimizer) is not torch.optim.SGD:
        raise ValueError(f"fused=True needs a torch.optim.SGD inner optimizer, got {type(optimizer).__name__}")
    rows: dict[int, int] = {}
    for s in slices:  # the fused update must visit every entry of a parameter exactly once
        covers = s.param.shape[0] if not isinstance(s, Slice) else s.n_groups if s.axis == 0 else -1
        rows[id(s.param)] = rows.get(id(s.param), 0) + covers
    partial = [s.name for s in slices if rows[id(s.param)] != s.param.shape[0]]
    if partial:
        raise ValueError(f"fused=True updates each parameter entry once, but penalize={penalize!r} "
                         f"regularizes {partial[0]} through overlapping slices (rows and columns); use "
                         "fused=False")
    for part, g in zip(slices, groups):
        bad = [k for k, ok in (("dampening", g["dampening"] == 0), ("nesterov", not g["nesterov"]),
                               ("maximize", not g["maximize"])) if not ok]
        if bad:
            raise ValueError(f"fused=True supports SGD without {', '.join(bad)} "
                             f"(the param group of {part.name!r} sets them)")


def check_capturable(opt: torch.optim.Optimizer, nan_guard: bool, device: torch.device) -> None:
    """Refuse what a capturable step cannot run without reading the device, with what to change."""
    if needs_closure(opt):
        raise ValueError(f"capturable=True cannot wrap {type(opt).__name__}: its step re-evaluates a closure "
                         "on the host; use capturable=False")
    if nan_guard and not isinstance(opt, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"capturable=True with nan_guard=True skips a non-finite step on the device, which "
                         f"needs an inner optimizer whose fresh state is zeros (SGD, Adam, AdamW), not "
                         f"{type(opt).__name__}: pass nan_guard=False (e.g. under a GradScaler, which guards itself)")
    if nan_guard and isinstance(opt, torch.optim.SGD) and any(
            g["momentum"] and g["dampening"] for g in opt.param_groups):
        raise ValueError("capturable=True with nan_guard=True starts SGD's momentum from zeros, exact only "
                         "without dampening: pass dampening=0 or nan_guard=False")
    if device.type == "cuda":
        slow = [i for i, g in enumerate(opt.param_groups) if g.get("capturable") is False and not g.get("fused")]
        if slow:
            raise ValueError(f"capturable=True on CUDA needs a capturable inner optimizer: param group {slow[0]} "
                             f"of {type(opt).__name__} has capturable=False (pass capturable=True or fused=True)")
