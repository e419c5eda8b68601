"""The model as ATen ops: ``torch.export`` (non-strict) on the example inputs.

Non-strict export runs the model's Python as written, so control flow on input *shapes* (timm's
dynamic 'SAME' padding, ``if x.shape[-2] < k``) is taken for the example's shapes, and every op a
module emits is recorded whatever the module's class: a ``BatchNorm2d`` subclass that calls
``F.batch_norm`` itself is one ``aten.batch_norm``, a weight-standardized conv is the ops that
standardize the weight followed by ``aten.conv2d``. The graph signature names every parameter and
buffer operand by its fully qualified name; ``nn_module_stack`` names the module that emitted an op.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class UntraceableModelError(RuntimeError):
    """The model could not be captured; the message names the module that failed."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module that a torch.compile, DataParallel or DistributedDataParallel wrapper runs."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


@contextmanager
def _innermost_module(model: nn.Module, seen: list):
    """Record the modules being run, so that a failure names the innermost one."""
    names = {id(m): name for name, m in model.named_modules()}
    stack: list[nn.Module] = []

    def enter(m, args):
        stack.append(m)

    def leave(m, args, out):
        if stack and stack[-1] is m:
            stack.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter),
                                                     m.register_forward_hook(leave))]
    try:
        yield
    except Exception:
        if stack:
            seen.append((names.get(id(stack[-1]), "?"), stack[-1]))
        raise
    finally:
        for h in handles:
            h.remove()


def _shapes(example_inputs: tuple):
    """The example inputs with every tensor written as its shape."""
    return torch.utils._pytree.tree_map(lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else x,
                                        list(example_inputs))


def _part_to_plan(model: nn.Module, failed: str) -> str:
    """A hint naming the child of ``model`` outside the ``failed`` module that holds the most of
    its layers (a detector's backbone): that part may plan where the whole does not."""
    def count(m: nn.Module) -> int:
        return sum(isinstance(x, LAYER_TYPES) for x in m.modules())

    total = count(model)
    parts = [(count(m), name, m) for name, m in model.named_children()
             if name != failed.split(".")[0] and count(m)]
    if not failed or not parts:
        return ""
    n, name, m = max(parts, key=lambda p: p[0])
    return (f", or plan the part of it that holds most of its layers: `model.{name}` ({type(m).__name__}, "
            f"{n} of its {total} Conv/Linear layers), with example inputs it takes, and compact that part")


def export(model: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """``model`` as an ATen graph, captured in eval mode (BatchNorm statistics untouched)."""
    was_training = model.training
    model.eval()
    failed: list = []
    try:
        with _innermost_module(model, failed):
            return torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as err:
        where, path = "the model's own forward", ""
        if failed and failed[0][1] is not model:
            path, m = failed[0]
            where = f"module '{path}' ({type(m).__name__})"
        raise UntraceableModelError(
            f"torch.export could not capture {where} on the example inputs of shapes "
            f"{_shapes(example_inputs)}: {type(err).__name__}: {str(err).splitlines()[0]}. "
            "greg_fast needs the model's ops to find which channels can be pruned; make that forward "
            "free of control flow on tensor values" + _part_to_plan(model, path) + ".") from err
    finally:
        model.train(was_training)


def emitter(node: torch.fx.Node) -> str:
    """'`path` (Class)': the innermost module whose forward emitted ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the model"
    path, cls = list(stack.values())[-1]
    cls = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return f"`{path}` ({cls})" if path else f"the model's forward ({cls})"


def module_path(node: torch.fx.Node) -> str:
    """The path of the innermost module whose forward emitted ``node`` ('' for the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def describe(node: torch.fx.Node) -> str:
    """The op and the module that emitted it, as a reason names them."""
    target = node.target
    op = getattr(target, "__name__", str(target))
    if hasattr(target, "overloadpacket"):
        op = target.overloadpacket.__name__
    return f"{emitter(node)}: {op}"


def model_arguments(example_inputs) -> tuple:
    """``example_inputs`` as the tuple of the model's arguments: one tensor, or a tuple whose
    entries are tensors or lists, tuples and dicts of them (a detector's list of images)."""
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(args, (tuple, list)):
        raise TypeError("example_inputs must be a tensor or a tuple of the model's arguments (tensors, or "
                        f"lists/tuples/dicts of tensors), got {type(example_inputs).__name__}")
    leaves = torch.utils._pytree.tree_leaves(tuple(args))
    odd = next((x for x in leaves if not isinstance(x, (torch.Tensor, int, float, bool, str, type(None)))), None)
    if odd is not None or not any(isinstance(x, torch.Tensor) for x in leaves):
        raise TypeError("example_inputs must be a tensor or a tuple of the model's arguments (tensors, or "
                        "lists/tuples/dicts of tensors), got "
                        + (f"a {type(odd).__name__} among them" if odd is not None else "no tensor"))
    return tuple(args)
