"""Physical compaction: remove pruned groups so the model is smaller and computes exactly what the
masked model (``apply_masks``) computes; the optimizer's state follows its parameters."""
from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
import torch.nn as nn

from .exact import Count, keep_counts
from .groups.stored import set_attribute
from .masks import apply_masks, check_masks
from . import ops
from .capture import LAYER_TYPES, NORM_TYPES, model_arguments, unwrap
from .result import Plan

def cuts(masks: Mapping[str, torch.Tensor], plan: Plan) -> dict[tuple[str, str], dict[int, torch.Tensor]]:
    """``{(module name, tensor name): {axis: kept indices}}`` implied by the masks: every member of
    a removed group loses that group's positions (a filter takes its weight row, bias, BatchNorm
    channel and every consumer's input columns; a coupled group takes all of its tensors' entries)."""
    check_masks(plan, masks)
    keeps: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for layer in plan.layers:
        mask = masks.get(layer.name)
        if mask is None or bool(mask.all()):
            continue
        if layer.granularity == "weight":
            raise ValueError("unstructured (weight) plans remove nothing physically: keep the masks, or "
                             "export with greg_fast.sparse.pack")
        if not bool(mask.any()):
            raise ValueError(f"the mask of {layer.name!r} keeps no group: a layer cannot be removed whole")
        removed = ~mask.reshape(-1).cpu()
        for key, positions in layer.members.items():
            tensor = getattr(plan.module(key.module), key.tensor) if key.tensor else None
            if tensor is None:
                continue
            axes = keeps.setdefault((key.module, key.tensor), {})
            keep = axes.setdefault(key.axis, torch.ones(tensor.shape[key.axis], dtype=torch.bool))
            keep[positions[removed].reshape(-1)] = False
    return {at: {axis: keep.nonzero().view(-1) for axis, keep in axes.items()} for at, axes in keeps.items()}


def _kept(masks: Mapping[str, torch.Tensor], plan: Plan, role: str) -> dict[tuple[str, str, int, int], int]:
    """``{(module, op, axis, width): entries kept}`` for the plan's tensorless members of ``role``."""
    keeps: dict[tuple[str, str, int, int], torch.Tensor] = {}
    for layer in plan.layers:
        mask = masks.get(layer.name)
        if layer.granularity == "weight" or (role != "width" and (mask is None or bool(mask.all()))):
            continue  # a width: every group that gives it counts, cut or not
        removed = torch.zeros(layer.n_groups, dtype=torch.bool) if mask is None else ~mask.reshape(-1).cpu()
        for key, positions in layer.members.items():
            if key.role == role:
                keep = keeps.setdefault((key.module, key.op, key.axis, key.width), torch.ones(key.width, dtype=torch.bool))
                keep[positions[removed].reshape(-1)] = False
    return {at: int(keep.sum()) for at, keep in keeps.items()}


def counts(masks: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, list[Count]]:
    """``{module name: [Count]}``: the ops whose width the masks change and that must compute with
    the masked model's width after compaction (the plan's "count" members)."""
    out: dict[str, list[Count]] = {}
    for (module, op, axis, width), kept in _kept(masks, plan, "count").items():
        out.setdefault(module, []).append(Count(op, axis, kept, width))
    return out


def stored_widths(masks: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, dict[str, int]]:
    """``{module name: {attribute: new value}}``: the widths a module's forward reads from its
    attributes (``num_heads``, ``shape[0]``) after the cut (the plan's "width" members)."""
    seen: dict[tuple[str, str], int] = {}
    out: dict[str, dict[str, int]] = {}
    for (module, spec, _, width), kept in _kept(masks, plan, "width").items():
        if seen.setdefault((module, spec), kept) != kept:  # two groups (or axes) that give one width: a tie broken
            raise ValueError(f"the masks leave `{module}.{spec}` two different widths ({seen[module, spec]} and "
                             f"{kept}): the groups that give it must lose channels in the proportion plan.ties "
                             "states (plan.set_counts and GrowingReg keep it)")
        if kept != width:
            out.setdefault(module, {})[spec] = kept
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


def _with_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` laid out in ``like``'s dimension order (a channels_last weight stays channels_last)."""
    if like.is_contiguous():
        return t
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # outermost first, ties as they are
    inverse = sorted(range(like.dim()), key=order.__getitem__)
    return t.permute(order).contiguous().permute(inverse)


def _cut_further(t: torch.Tensor, axes: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``t`` with only the kept indices along axes past the first two (gather cuts rows and columns)."""
    for axis, keep in axes.items():
        t = _with_layout(t.index_select(axis, keep.to(t.device)).contiguous(), t)
    return t


def gather(tensors, rows, cols, *, backend: str = "auto") -> list[torch.Tensor]:
    """Gather rows and columns of many tensors: in one C++ call on CPU when built, else PyTorch.
    Each result keeps its source's dtype, device and dimension order (memory format)."""
    if backend not in ("auto", "torch", "cpp"):
        raise ValueError(f"gather backend must be auto, cpp or torch, got {backend!r}")
    missing = ops.unavailable()
    if backend == "cpp" and missing is not None:
        raise RuntimeError(f"backend 'cpp' cannot gather: {missing}")
    if backend == "cpp" or (backend == "auto" and missing is None
                            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)):
        return ops.gather(tensors, rows, cols)
    return [_with_layout(t, like) for t, like in zip(_gather_torch(tensors, rows, cols), tensors)]


@torch.no_grad()
def compact(model: nn.Module, masks: Mapping[str, torch.Tensor], plan: Plan,
            optimizer: torch.optim.Optimizer | None = None, *, backend: str = "auto", verify: bool = True) -> nn.Module:
    """Remove the pruned groups of ``model`` physically, in place, and return it.

    Every cut is computed and checked, and every new tensor built, before the model or the
    optimizer is touched: a failure leaves both as they were. With ``optimizer``, its parameter
    references and every state tensor shaped like a parameter (SGD momentum, Adam's moments) are cut
    the same way, so training continues where it was. Afterwards ``plan`` describes the model as it
    was (``plan.compacted`` is True): plan the compacted model anew to prune it further.

    ``verify`` (the default) first compacts copies and runs the plan's example inputs through the
    masked and the compacted copy: if they differ beyond rounding (for approximate groups: if the
    compacted copy does not run), it raises, naming the output and the first module that differs,
    and nothing is touched. ``verify=False`` skips that (it needs two copies of the model).
    """
    if isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # a wrapper: GrowingReg, ...
        raise ValueError(f"compact() got the {type(optimizer).__name__} wrapper as optimizer: its plan describes the "
                         "model before compaction, so it cannot step the compacted one. Pass its inner optimizer "
                         "(optimizer=greg.optimizer, whose state is cut to match) and keep training with that")
    plan.check_model(model)
    plan_cuts = cuts(masks, plan)
    if not plan_cuts:  # nothing removed: the model and the plan stay as they are
        return model
    if verify:
        exact = not any(l.approximate and l.name in masks and not bool(masks[l.name].all()) for l in plan.layers)
        error = compaction_error(model, masks, plan, plan.example_inputs, exact=exact)
        if error is not None:
            raise ValueError(f"compact() refused: {error}. The model and the optimizer are untouched; this is a "
                             "bug of greg_fast's analysis of this model: please report it (verify=False compacts "
                             "anyway)")
    empty = torch.empty(0, dtype=torch.int64)
    jobs = []  # (module, attribute, old tensor, rows, cols, further axes: a position embedding's channels)
    for (name, attr), axes in plan_cuts.items():
        module = plan.module(name)
        jobs.append((module, attr, getattr(module, attr), axes.get(0, empty), axes.get(1, empty),
                     {a: keep for a, keep in axes.items() if a > 1}))
    state = optimizer.state if optimizer is not None else {}
    extra = [(job, key, value) for job in jobs for key, value in state.get(job[2], {}).items()
             if isinstance(value, torch.Tensor) and value.shape == job[2].shape]
    tensors = [j[2].detach() for j in jobs] + [v for _, _, v in extra]
    rows = [j[3] for j in jobs] + [j[3] for j, _, _ in extra]
    cols = [j[4] for j in jobs] + [j[4] for j, _, _ in extra]
    further = [j[5] for j in jobs] + [j[5] for j, _, _ in extra]
    new = [_cut_further(t, axes) for t, axes in zip(gather(tensors, rows, cols, backend=backend), further)]

    # from here on nothing can fail: swap the tensors in
    replaced = {}
    for (module, attr, old, *_), tensor in zip(jobs, new):
        if isinstance(old, nn.Parameter):
            param = nn.Parameter(tensor, requires_grad=old.requires_grad)
            replaced[old] = param
            setattr(module, attr, param)
        else:
            setattr(module, attr, tensor)
    for name in dict.fromkeys(name for name, _ in plan_cuts):
        set_widths(plan.module(name))
    for name, module_counts in counts(masks, plan).items():
        keep_counts(plan.module(name), module_counts)
    for name, values in stored_widths(masks, plan).items():
        for spec, value in values.items():
            set_attribute(plan.module(name), spec, value)
    for layer in plan.layers:  # BatchNorms without any tensor (affine=False, no running stats)
        for norm in layer.norms:
            bn = plan.module(norm)
            if bn.weight is None and bn.running_mean is None and layer.name in masks:
                bn.num_features -= int((~masks[layer.name]).sum())
    if optimizer is not None:
        moved = {}
        for ((_, _, old, *_), key, _), tensor in zip(extra, new[len(jobs):]):
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


def _masked_and_compacted(model: nn.Module, masks: Mapping[str, torch.Tensor], plan: Plan):
    """Copies of ``model`` (eval mode): masked, and masked then compacted (the model is not touched)."""
    masked, masked_plan = copy.deepcopy((unwrap(model), plan))
    masked.eval()
    apply_masks(masked, masks, masked_plan)
    small, small_plan = copy.deepcopy((masked, masked_plan))
    compact(small, masks, small_plan, verify=False)
    return masked, small




@torch.no_grad()
def output_change(model: nn.Module, masks: Mapping[str, torch.Tensor], plan: Plan, example_inputs, *,
                  per_output: bool = False) -> float | dict[str, float]:
    """``max |compacted(x) - masked(x)| / max |masked(x)|`` in eval mode, on copies (the model is
    not touched): rounding for exact plans, the real change for approximate groups. An output that
    is a structure (a segmentation model's dict, a detection backbone's OrderedDict, tuples) is
    compared leaf by leaf, each relative to its own scale, and the largest change is returned;
    ``per_output=True`` returns every tensor leaf's change by path (``"['out']"``), largest first.
    A leaf that changes shape or, for integer outputs, value counts as ``inf``."""
    masked, small = _masked_and_compacted(model, masks, plan)
    x = model_arguments(example_inputs)
    with torch.no_grad():
        a, b = _outputs(masked, x), _outputs(small, x)
    if [p for p, _ in a] != [p for p, _ in b]:
        raise RuntimeError(f"the compacted model's outputs are {[p for p, _ in b]}, the masked model's "
                           f"{[p for p, _ in a]}: compaction changed the output structure")
    if not a:
        raise ValueError("the model's output holds no tensor to compare")
    changes = sorted(((path, _change(t, u)) for (path, t), (_, u) in zip(a, b)), key=_largest_first)
    return dict(changes) if per_output else changes[0][1]


def _outputs(model: nn.Module, x: tuple, record: dict | None = None):
    """``model(*x)`` as ``[(path, tensor)]``; with ``record``, every module's tensor output by name."""
    handles = []
    if record is not None:
        for name, m in model.named_modules():
            handles.append(m.register_forward_hook(
                lambda m, args, out, name=name: record.setdefault(name, out) if isinstance(out, torch.Tensor) else None))
    try:
        leaves = torch.utils._pytree.tree_flatten_with_path(model(*x))[0]
    finally:
        for h in handles:
            h.remove()
    return [(torch.utils._pytree.keystr(path) or "the output", t) for path, t in leaves if isinstance(t, torch.Tensor)]


def _largest_first(path_change: tuple[str, float]) -> float:
    change = path_change[1]
    return float("-inf") if math.isnan(change) else -change  # NaN: the worst change


def _change(a: torch.Tensor, b: torch.Tensor) -> float:
    """The relative difference of two outputs: inf where they differ in shape (or in value, for
    integer outputs), NaN where either is not finite."""
    if a.shape != b.shape:
        return float("inf")
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    if not a.numel():
        return 0.0
    return float((a - b).abs().max() / a.abs().max().clamp_min(torch.finfo(a.dtype).tiny))


def _differs(a: torch.Tensor, b: torch.Tensor, tol: float) -> float | None:
    """The relative difference of two outputs when it is beyond ``tol`` (NaN differs too)."""
    change = _change(a, b)
    return change if not change <= tol else None


@torch.no_grad()
def compaction_error(model: nn.Module, masks: Mapping[str, torch.Tensor], plan: Plan, example_inputs,
                     exact: bool = True, precise: bool = True) -> str | None:
    """Why compacting ``model`` with ``masks`` would not give the masked model's outputs on
    ``example_inputs`` (None when it does), tried on copies in float64 (so that a random-init net
    does not amplify float32 rounding into a false alarm). ``exact=False`` (approximate groups):
    the compacted model need only run and give outputs of the same shapes. ``precise=False``
    compares in the model's own precision to 1e-3 (relative): a quicker check that finds the cuts
    that do not follow (plan()'s search for them), to be confirmed in float64."""
    masked, small = _masked_and_compacted(model, masks, plan)
    x = model_arguments(example_inputs)
    tol = 1e-9
    try:  # a cheap run first: plan()'s trials mostly fail by not running, and then skip the float64 ones
        got = _outputs(small, x)
    except Exception as err:
        return f"the compacted model does not run on the example inputs: {type(err).__name__}: {str(err).splitlines()[0]}"
    if not precise:
        ref, tol = _outputs(masked, x), 1e-3
    else:
        try:
            x64 = torch.utils._pytree.tree_map(
                lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)
            masked.double(), small.double()
            ref = _outputs(masked, x64)
            x = x64
        except Exception:  # a model that casts for itself: compare in its own precision
            masked.float(), small.float()
            ref, tol = _outputs(masked, x), 1e-4
        try:
            got = _outputs(small, x)
        except Exception as err:
            return f"the compacted model does not run on the example inputs: {type(err).__name__}: {str(err).splitlines()[0]}"
    if len(got) != len(ref):
        return f"the compacted model gives {len(got)} output tensors, the masked model {len(ref)}"
    for (path, a), (_, b) in zip(ref, got):
        change = _differs(a, b, tol if exact else float("inf"))
        if change is not None:
            if a.shape != b.shape:
                return f"{path} of the compacted model has shape {tuple(b.shape)}, the masked model's {tuple(a.shape)}"
            if not precise:  # the search needs only whether
                return f"{path} of the compacted model differs from the masked model's by {change:.2g} (relative)"
            seen_masked, seen_small = {}, {}
            _outputs(masked, x, seen_masked), _outputs(small, x, seen_small)
            first = next((name for name, t in seen_masked.items() if name in seen_small and name
                          and _differs(t, seen_small[name], tol) is not None), None)
            where = "" if first is None else (
                f"; the first module whose output differs is `{first}` ({type(masked.get_submodule(first)).__name__})")
            return f"{path} of the compacted model differs from the masked model's by {change:.2g} (relative){where}"
    return None


def set_widths(module: nn.Module) -> None:
    """Make a module's size attributes agree with its (cut) tensors."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, LAYER_TYPES):
        if module.groups > 1 and module.in_channels == module.groups:  # depthwise: a group per input channel
            module.groups = w.shape[0] // (module.out_channels // module.groups)
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, NORM_TYPES):
        module.num_features = (module.running_mean if module.running_mean is not None else w).shape[0]
    elif isinstance(module, nn.GroupNorm) and w is not None:
        module.num_channels = w.shape[0]
    elif isinstance(module, nn.LayerNorm) and w is not None:
        module.normalized_shape = (w.shape[0],)


def compacted_copy(plan: Plan, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A compacted copy of the planned model (the model itself is not touched)."""
    model, copied = copy.deepcopy((plan.module(""), plan))
    return compact(model.eval(), masks, copied, verify=False)
