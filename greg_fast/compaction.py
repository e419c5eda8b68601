"""Physical compaction: remove pruned groups so the model is smaller and computes exactly what the
masked model (``apply_masks``) computes; the optimizer's state follows its parameters."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from .masks import check_masks
from . import ops
from .graph import LAYER_TYPES
from .plan import Plan

_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().reshape(-1).cpu()


def _expand(keep: torch.Tensor, spatial: int) -> torch.Tensor:
    """Kept channels -> kept input features when each channel is ``spatial`` flattened features."""
    if spatial == 1:
        return keep
    return (keep[:, None] * spatial + torch.arange(spatial)).reshape(-1)


def cuts(masks: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"out": kept output indices, "in": kept input indices}}`` implied by the masks:
    a removed filter takes its weight row, bias, BatchNorm channel and every consumer's input
    columns; a removed input channel (channel granularity) also takes its producer's filter."""
    check_masks(plan, masks)
    out: dict[str, dict[str, torch.Tensor]] = {}

    def cut(name, side, keep):
        out.setdefault(name, {})[side] = keep

    for layer in plan.layers:
        mask = masks.get(layer.name)
        if mask is None or bool(mask.all()):
            continue
        if layer.granularity == "weight":
            raise ValueError("unstructured (weight) plans remove nothing physically: keep the masks, or "
                             "export with greg_fast.sparse.pack")
        keep = _indices(mask)
        if keep.numel() == 0:
            raise ValueError(f"the mask of {layer.name!r} keeps no group: a layer cannot be removed whole")
        if layer.granularity == "filter":
            producer, consumers = layer.name, layer.consumers
        else:
            producer, consumers = layer.producer, [layer.name]
        cut(producer, "out", keep)
        for norm in plan.norms_of(producer):
            cut(norm, "out", keep)
        for consumer in consumers:
            spatial = plan.module(consumer).weight.shape[1] // mask.numel()
            cut(consumer, "in", _expand(keep, spatial))
    return out


def _gather_torch(tensors, rows, cols) -> list[torch.Tensor]:
    """The reference gather: ``t[rows][:, cols]`` (an empty index tensor keeps the whole axis)."""
    out = []
    for t, r, c in zip(tensors, rows, cols):
        if r.numel():
            t = t.index_select(0, r.to(t.device))
        if c.numel():
            t = t.index_select(1, c.to(t.device))
        out.append(t.contiguous())
    return out


def gather(tensors, rows, cols, *, backend: str = "auto") -> list[torch.Tensor]:
    """Gather rows and columns of many tensors: in one C++ call on CPU when built, else PyTorch."""
    if backend not in ("auto", "torch", "cpp"):
        raise ValueError(f"gather backend must be auto, cpp or torch, got {backend!r}")
    missing = ops.unavailable()
    if backend == "cpp" and missing is not None:
        raise RuntimeError(f"backend 'cpp' cannot gather: {missing}")
    if backend == "cpp" or (backend == "auto" and missing is None
                            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)):
        return ops.gather(tensors, rows, cols)
    return _gather_torch(tensors, rows, cols)


@torch.no_grad()
def compact(model: nn.Module, masks: Mapping[str, torch.Tensor], plan: Plan,
            optimizer: torch.optim.Optimizer | None = None, *, backend: str = "auto") -> nn.Module:
    """Remove the pruned groups of ``model`` physically, in place, and return it.

    Every cut is computed and checked, and every new tensor built, before the model or the
    optimizer is touched: a failure leaves both as they were. With ``optimizer``, its parameter
    references and every state tensor shaped like a parameter (SGD momentum, Adam's moments) are cut
    the same way, so training continues where it was. Afterwards ``plan`` describes the model as it
    was (``plan.compacted`` is True): plan the compacted model anew to prune it further.
    """
    plan.check_model(model)
    plan_cuts = cuts(masks, plan)
    if not plan_cuts:  # nothing removed: the model and the plan stay as they are
        return model
    empty = torch.empty(0, dtype=torch.int64)
    jobs = []  # (module, attribute, old tensor, rows, cols)
    for name, cut in plan_cuts.items():
        module = plan.module(name)
        rows, cols = cut.get("out", empty), cut.get("in", empty)
        if isinstance(module, LAYER_TYPES):
            jobs.append((module, "weight", module.weight, rows, cols))
            if module.bias is not None:
                jobs.append((module, "bias", module.bias, rows, empty))
        else:  # a BatchNorm (an affine-free one without running statistics has no tensor to cut)
            jobs += [(module, a, getattr(module, a), rows, empty) for a in _NORM_TENSORS
                     if getattr(module, a) is not None]
    state = optimizer.state if optimizer is not None else {}
    extra = [(job, key, value) for job in jobs for key, value in state.get(job[2], {}).items()
             if isinstance(value, torch.Tensor) and value.shape == job[2].shape]
    tensors = [j[2].detach() for j in jobs] + [v for _, _, v in extra]
    rows = [j[3] for j in jobs] + [j[3] for j, _, _ in extra]
    cols = [j[4] for j in jobs] + [j[4] for j, _, _ in extra]
    new = gather(tensors, rows, cols, backend=backend)

    # from here on nothing can fail: swap the tensors in
    replaced = {}
    for (module, attr, old, _, _), tensor in zip(jobs, new):
        if isinstance(old, nn.Parameter):
            param = nn.Parameter(tensor, requires_grad=old.requires_grad)
            replaced[old] = param
            setattr(module, attr, param)
        else:
            setattr(module, attr, tensor)
    for name, cut in plan_cuts.items():
        kept_out = cut.get("out")
        set_widths(plan.module(name), None if kept_out is None else kept_out.numel())
    if optimizer is not None:
        moved = {}
        for ((_, _, old, _, _), key, _), tensor in zip(extra, new[len(jobs):]):
            moved.setdefault(old, {})[key] = tensor
        for group in optimizer.param_groups:
            group["params"] = [replaced.get(p, p) for p in group["params"]]
        for old, param in replaced.items():
            if old in optimizer.state:
                entry = optimizer.state.pop(old)
                entry.update(moved.get(old, {}))
                optimizer.state[param] = entry
    plan.compacted = True
    return model


def set_widths(module: nn.Module, out_width: int | None = None) -> None:
    """Make a module's size attributes agree with its (cut) tensors; ``out_width`` gives a
    BatchNorm's width when it holds no tensor (affine=False, track_running_stats=False)."""
    w = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, LAYER_TYPES):
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif out_width is not None:
        module.num_features = out_width
    else:
        module.num_features = (module.running_mean if module.running_mean is not None else w).shape[0]
