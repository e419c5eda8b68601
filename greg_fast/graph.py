"""Channel-dependency analysis of a model's torch.fx graph.

For every Conv/Linear layer it answers two questions, from the graph and not from names:
- can its filters (output channels) be cut?  Only when every consumer of those channels can be
  cut to match. The walk tracks which axis of each tensor carries the channels (and how many
  consecutive elements of that axis one channel spans once flattened) through view, reshape,
  flatten, permute and transpose. BatchNorm over that axis, pooling over other axes and
  elementwise ops that map 0 to 0 pass the channels through (BatchNorms are cut too), so a removed
  channel stays exactly zero; ungrouped convs reading the axis as their input channels, and linears
  reading it as their last axis, end the walk (their input columns are cut).
- can its input channels be cut?  Only when they come, through such ops, from a single producer
  layer whose filters can be cut and that feeds nothing else.
Anything else (residual add, concat, grouped conv, model output, an op that maps 0 elsewhere, a
module used more than once, an unknown op) excludes the layer with a reason.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Pooling modules and functions, by the number of trailing axes they pool over.
_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
          nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
          nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
_POOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
                   F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
                   F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
                   F.adaptive_max_pool3d: 3}
# Elementwise ops with no per-channel state. Whether a removed (zero) channel stays zero through one
# is decided by evaluating it at 0, not by this list: Sigmoid, Softplus or Hardtanh(min_val > 0)
# map 0 elsewhere, and the masked model would still feed that constant to the consumer.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
                nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu,
                          F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus,
                          torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout1d,
                          F.dropout2d, F.dropout3d}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_PERMUTES = {"permute", "transpose", torch.permute, torch.transpose}
# Reductions over other axes than the channels' (global pooling as x.mean((2, 3))): 0 stays 0.
_REDUCTIONS = {"mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin}
_METADATA_METHODS = {"size", "dim", "numel"}  # uses that read the shape, not the values
_ADDS = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub}
_CONCATS = {torch.cat, torch.concat, torch.stack}


from .capture import UntraceableModelError  # noqa: E402  (one error type for both captures)


@dataclass
class Consumer:
    """A layer that reads a producer's channels as its input channels."""
    name: str
    spatial: int  # input features per producer channel (>1 only for flatten-before-linear)


@dataclass
class LayerDeps:
    name: str
    module: nn.Module
    consumers: list[Consumer] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)     # BatchNorms carrying this layer's filters
    filter_reason: str | None = None                    # why its filters cannot be cut
    producer: str | None = None                         # the layer whose filters are its input channels
    input_spatial: int = 1                              # features per input channel (flatten-before-linear)
    channel_reason: str | None = None                   # why its input channels cannot be cut


class _NamingTracer(fx.Tracer):
    """A tracer that remembers the innermost module being traced when tracing fails."""

    def __init__(self):
        super().__init__()
        self.failed_module: tuple[str, nn.Module] | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = (self.path_of_module(m), m)
            raise


def unwrap(model: nn.Module) -> nn.Module:
    """The module that a torch.compile, DataParallel or DistributedDataParallel wrapper runs."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def trace(model: nn.Module) -> fx.GraphModule:
    tracer = _NamingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:
        where = "the model's own forward"
        if tracer.failed_module is not None:
            path, m = tracer.failed_module
            where = f"module '{path or '<root>'}' ({type(m).__name__})"
        raise UntraceableModelError(
            f"torch.fx could not trace {where}: {type(err).__name__}: {err}. greg_fast needs a "
            "traceable graph to find which layers can be pruned; make that forward free of "
            "data-dependent control flow.") from err
    return fx.GraphModule(tracer.root, graph)


def _shape(node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


@dataclass(frozen=True)
class _Axis:
    """Where a layer's channels are in a tensor: axis ``dim`` holds them, each channel spanning
    ``block`` consecutive entries (1, or the features per channel after a flatten)."""
    dim: int
    block: int = 1


def _reshaped(src: tuple, out: tuple, at: _Axis, channels: int) -> _Axis | None:
    """The channels' axis after a reshape from ``src`` to ``out`` (row-major), or None when a
    channel no longer fills whole entries of one axis (it would be cut across axes)."""
    outer = math.prod(src[:at.dim])
    per_channel = at.block * math.prod(src[at.dim + 1:])  # consecutive elements of one channel
    for dim in reversed(range(len(out))):  # the later axis where size-1 axes make two fit
        if math.prod(out[:dim]) != outer:
            continue
        inner = math.prod(out[dim + 1:])
        if inner and per_channel % inner == 0 and out[dim] == channels * (per_channel // inner):
            return _Axis(dim, per_channel // inner)
    return None


def _shape_args(node: fx.Node) -> list:
    """The target shape of a view/reshape call as written: ``x.view(a, b)`` or ``x.view((a, b))``."""
    args = list(node.args[1:]) or list(node.kwargs.get("shape", node.kwargs.get("size", ())))
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    return args


def _permuted(node: fx.Node, ndim: int, at: _Axis) -> _Axis | None:
    args = list(node.args[1:])
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "transpose":
        d0, d1 = (args + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
        if not (isinstance(d0, int) and isinstance(d1, int)):
            return None
        d0, d1 = d0 % ndim, d1 % ndim
        return _Axis(d1 if at.dim == d0 else d0 if at.dim == d1 else at.dim, at.block)
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args or node.kwargs.get("dims")
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    return _Axis([d % ndim for d in dims].index(at.dim), at.block)


def _reduced(node: fx.Node, ndim: int, at: _Axis) -> _Axis | None:
    """The channels' axis after a reduction over other axes, or None if it reduces over them."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or not isinstance(keepdim, bool):
        return None  # over everything, or written so that it cannot be read here
    dims = {d % ndim for d in ((dims,) if isinstance(dims, int) else dims)}
    if at.dim in dims:
        return None
    return _Axis(at.dim if keepdim else at.dim - sum(d < at.dim for d in dims), at.block)


def _maps_zero_to_zero(fn, node: fx.Node, shape, dtype) -> bool:
    """Evaluate an elementwise op at 0 (with the call's other arguments): a removed channel is
    all zeros in the masked model and must stay zero for the cut model to compute the same."""
    if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return False  # an argument computed at run time: cannot evaluate it here
    with torch.no_grad():  # one element per axis: elementwise, so the value is all that matters
        out = fn(torch.zeros((1,) * len(shape), dtype=dtype), *node.args[1:], **node.kwargs)
    return isinstance(out, torch.Tensor) and bool((out == 0).all())


def _describe(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} '{target}' at node '{node.name}'"


def _step(node: fx.Node, src: fx.Node, at: _Axis, channels: int, modules: dict, shared: dict,
          deps: LayerDeps) -> tuple[str | None, _Axis | None]:
    """What ``node`` does to the channels it reads from ``src`` at ``at``: (reason to stop the
    whole walk, where the channels are in its output; None there ends this branch)."""
    src_shape, out_shape = _shape(src), _shape(node)
    ndim = len(src_shape) if src_shape is not None else 0
    if node.op == "output":
        return "its output is a model output", None
    if src_shape is None:
        return f"no shape is known for the input of {_describe(node)}", None
    target = node.target
    if node.op == "call_module":
        m = modules[target]
        if target in shared and isinstance(m, LAYER_TYPES + NORM_TYPES):
            return f"it feeds '{target}', which is used more than once: {shared[target]}", None
        if isinstance(m, LAYER_TYPES):
            if node.args[0] is not src:
                return f"it feeds '{target}' through an argument other than the input", None
            if isinstance(m, nn.Linear):
                if at.dim != ndim - 1 or m.in_features != channels * at.block:
                    return f"linear '{target}' does not read the channels as its input features", None
            elif at.block != 1 or at.dim != ndim - m.weight.dim() + 1:
                return f"conv '{target}' does not read the channels as its input channels", None
            elif m.groups != 1:
                return f"it feeds grouped/depthwise conv '{target}' (groups={m.groups})", None
            deps.consumers.append(Consumer(target, at.block))
            return None, None
        if isinstance(m, NORM_TYPES):
            if at.block != 1 or at.dim != 1 or m.num_features != channels:
                return f"BatchNorm '{target}' does not normalize over its {channels} channels", None
            deps.norms.append(target)
            return None, at
        if type(m) in _POOLS:
            if at.dim >= ndim - _POOLS[type(m)]:
                return f"pooling '{target}' pools over the channel axis", None
            return None, at
        if isinstance(m, nn.Flatten):
            new = _reshaped(src_shape, out_shape, at, channels) if out_shape is not None else None
            return (None, new) if new else (f"flatten '{target}' splits a channel across axes", None)
        if isinstance(m, _ELEMENTWISE):
            if not _maps_zero_to_zero(m, node, src_shape, src.meta["tensor_meta"].dtype):
                return f"{type(m).__name__} '{target}' maps 0 to a non-zero value, so a removed " \
                       f"channel would still reach the consumer", None
            return None, at
        return f"it feeds unsupported module '{target}' ({type(m).__name__})", None
    if node.op not in ("call_function", "call_method"):
        return f"it feeds unsupported {_describe(node)}", None
    if (node.op == "call_function" and target is getattr) or target in _METADATA_METHODS:
        return None, None  # x.shape, x.size(): reads the shape, not the values
    if target in _ADDS:
        return f"it reaches a residual add ('{node.name}')", None
    if target in _CONCATS:
        return f"it reaches a concat ('{node.name}')", None
    if node.args[0] is not src:
        return f"it feeds {_describe(node)} through an argument other than the input", None
    if target in _POOL_FUNCTIONS:
        if at.dim >= ndim - _POOL_FUNCTIONS[target]:
            return f"pooling '{node.name}' pools over the channel axis", None
        return None, at
    if target in _REDUCTIONS:
        new = _reduced(node, ndim, at)
        return (None, new) if new else (f"{_describe(node)} reduces over the channel axis", None)
    if target in _PERMUTES:
        new = _permuted(node, ndim, at)
        return (None, new) if new else (f"cannot follow the channel axis through {_describe(node)}", None)
    if target in (torch.flatten, torch.reshape) or target in _RESHAPE_METHODS:
        new = _reshaped(src_shape, out_shape, at, channels) if out_shape is not None else None
        if new is None:
            return f"{_describe(node)} splits a channel across axes", None
        if target in ("view", "reshape", torch.reshape):  # flatten derives its sizes, these are written
            written = _shape_args(node)
            width = written[new.dim] if new.dim < len(written) else None
            if isinstance(width, int) and width != -1:
                return (f"{_describe(node)} writes the channel axis as the literal {width}, which "
                        "cannot follow the pruned width (write -1 or x.size(...))"), None
        return None, new
    if (node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS) or target in _ELEMENTWISE_METHODS:
        fn = target if node.op == "call_function" else getattr(torch.Tensor, target)
        if not _maps_zero_to_zero(fn, node, src_shape, src.meta["tensor_meta"].dtype):
            return f"{_describe(node)} maps 0 to a non-zero value, so a removed channel would still " \
                   "reach the consumer", None
        return None, at
    return f"it feeds unsupported {_describe(node)}", None


def _walk_forward(gm: fx.GraphModule, start: fx.Node, start_axis: _Axis, channels: int, deps: LayerDeps,
                  shared: dict) -> None:
    """Follow a layer's output channels to their consumers; set deps.filter_reason on failure."""
    modules = dict(gm.named_modules())
    stack = [(user, start, start_axis) for user in start.users]
    seen = set()
    while stack:
        node, src, at = stack.pop()
        if (node, src, at) in seen:
            continue
        seen.add((node, src, at))
        reason, out = _step(node, src, at, channels, modules, shared, deps)
        if reason is not None:
            deps.filter_reason = deps.filter_reason or reason
            return
        if out is not None:
            stack.extend((user, node, out) for user in node.users)


def _walk_backward(node: fx.Node, modules: dict, layer_names: set) -> tuple[str | None, str | None]:
    """Find the layer whose filters are ``node``'s channels: (producer name, reason if none)."""
    passing = (NORM_TYPES + tuple(_POOLS) + _ELEMENTWISE + (nn.Flatten,))
    while True:
        if node.op == "placeholder":
            return None, "its input channels come from the model input"
        if node.op == "call_module":
            if node.target in layer_names:
                return node.target, None
            if not isinstance(modules[node.target], passing):
                return None, f"its input comes from unsupported module '{node.target}'"
        elif node.op == "call_function":
            ok = _ELEMENTWISE_FUNCTIONS | set(_POOL_FUNCTIONS) | _PERMUTES | _REDUCTIONS | {torch.flatten, torch.reshape}
            if node.target not in ok:
                return None, f"its input comes from {_describe(node)}"
        elif node.op == "call_method":
            if node.target not in _ELEMENTWISE_METHODS | _RESHAPE_METHODS | _PERMUTES | _REDUCTIONS:
                return None, f"its input comes from {_describe(node)}"
        else:
            return None, f"its input comes from {_describe(node)}"
        node = node.args[0]


def _shared_modules(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """Modules whose cut would reach more than one place: ``{name: why}``. Such a module is called
    more than once, has its parameters or buffers read directly by the graph (``F.conv2d(x,
    self.conv.weight)``), or shares a parameter with another module (tied weights)."""
    why: dict[str, str] = {}
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr" and "." in node.target:
            owner = node.target.rsplit(".", 1)[0]
            why.setdefault(owner, f"the model also reads its tensor '{node.target}' directly")
    for name, n in calls.items():
        if n > 1:
            why.setdefault(name, f"called {n} times")
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    for names in owners.values():
        if len(set(names)) > 1:
            for name in names:
                why.setdefault(name, "it shares a parameter with " + ", ".join(
                    repr(n) for n in sorted(set(names)) if n != name))
    return why


def traced_with_shapes(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """The traced model with every node's output shape (``tensor_meta``) from one eval-mode run."""
    gm = trace(model)
    was_training = model.training
    model.eval()  # shape propagation runs the model: keep BatchNorm statistics untouched
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as err:
        raise ValueError(f"running the model on example_inputs of shapes "
                         f"{[tuple(x.shape) for x in example_inputs]} failed: {err}") from err
    finally:
        model.train(was_training)
    return gm


def analyze(model: nn.Module, example_inputs: tuple) -> tuple[dict[str, LayerDeps], list[str]]:
    """Dependencies of every Conv/Linear layer, and the layers in execution order."""
    gm = traced_with_shapes(model, example_inputs)
    modules = dict(gm.named_modules())
    shared = _shared_modules(model, gm)
    calls: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], LAYER_TYPES):
            calls.setdefault(node.target, node)
    order = list(calls)
    deps = {name: LayerDeps(name, modules[name]) for name in order}

    for name, node in calls.items():
        d, m = deps[name], modules[name]
        out = _shape(node)
        if name in shared:
            d.filter_reason = d.channel_reason = f"the module is used more than once: {shared[name]}"
            continue
        if isinstance(m, nn.Linear):
            _walk_forward(gm, node, _Axis(len(out) - 1), m.out_features, d, shared)
        elif m.groups != 1:
            d.filter_reason = d.channel_reason = f"grouped/depthwise conv (groups={m.groups})"
        else:  # batched [B, C, ...] or unbatched [C, ...]
            _walk_forward(gm, node, _Axis(len(out) - m.weight.dim() + 1), m.out_channels, d, shared)
        if d.filter_reason is not None:
            d.consumers, d.norms = [], []

    for name, node in calls.items():
        d = deps[name]
        if d.channel_reason is not None:
            continue
        producer, reason = _walk_backward(node.args[0], modules, set(order))
        if reason is None:
            p = deps[producer]
            if p.filter_reason is not None:
                reason = f"its producer '{producer}' cannot be cut: {p.filter_reason}"
            elif [c.name for c in p.consumers] != [name]:
                reason = f"its producer '{producer}' also feeds " + ", ".join(
                    repr(c.name) for c in p.consumers if c.name != name)
            else:
                d.producer, d.input_spatial = producer, p.consumers[0].spatial
        d.channel_reason = reason
    return deps, order
