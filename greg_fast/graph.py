"""Channel-dependency analysis of a model's torch.fx graph.

For every Conv/Linear layer it answers two questions, from the graph and not from names:
- can its filters (output channels) be cut?  Only when every consumer of those channels can be
  cut to match: BatchNorm, elementwise activations, pooling and dropout pass the channels through
  (BatchNorms are cut too), ungrouped convs and linears end the walk (their input channels are
  cut; a flatten before a linear turns one channel into ``spatial`` features).
- can its input channels be cut?  Only when they come, through such channel-wise ops, from a
  single producer layer whose filters can be cut and that feeds nothing else.
Anything else (residual add, concat, grouped conv, model output, an unknown op) excludes the
layer with a reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# Elementwise modules with no per-channel state: the channels pass through untouched.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
                nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu,
                          F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus,
                          torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout1d,
                          F.dropout2d, F.dropout3d}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                   F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_METADATA_METHODS = {"size", "dim", "numel"}  # uses that read the shape, not the values
_ADDS = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub}
_CONCATS = {torch.cat, torch.concat, torch.stack}


class UntraceableModelError(RuntimeError):
    """torch.fx could not trace the model; the message names the module that failed."""


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


def _is_flatten(node: fx.Node, channels: int) -> int | None:
    """For a reshape of a [B, C, ...] tensor to [B, C*s], return s (features per channel)."""
    src, out = _shape(node.args[0]), _shape(node)
    if src is None or out is None or len(out) != 2 or len(src) < 2 or src[1] != channels:
        return None
    if out[0] != src[0] or out[1] % channels:
        return None
    return out[1] // channels


def _describe(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} '{target}' at node '{node.name}'"


def _walk_forward(gm: fx.GraphModule, start: fx.Node, channels: int, deps: LayerDeps) -> None:
    """Follow a layer's output channels to their consumers; set deps.filter_reason on failure."""
    modules = dict(gm.named_modules())
    stack = [(user, start, 1) for user in start.users]
    seen = set()
    while stack:
        node, src, spatial = stack.pop()
        if (node, spatial) in seen:
            continue
        seen.add((node, spatial))
        follow = True
        reason = None
        if node.op == "output":
            reason = "its output is a model output"
        elif node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, LAYER_TYPES):
                follow = False
                if node.args[0] is not src:
                    reason = f"it feeds '{node.target}' through an argument other than the input"
                elif isinstance(m, nn.Linear):
                    if m.in_features != channels * spatial:
                        reason = f"'{node.target}' does not read the channels as contiguous features"
                    else:
                        deps.consumers.append(Consumer(node.target, spatial))
                elif spatial != 1:
                    reason = f"a flattened output feeds conv '{node.target}'"
                elif m.groups != 1:
                    reason = f"it feeds grouped/depthwise conv '{node.target}' (groups={m.groups})"
                else:
                    deps.consumers.append(Consumer(node.target, 1))
            elif isinstance(m, _NORMS):
                if spatial != 1 or m.num_features != channels:
                    reason = f"BatchNorm '{node.target}' does not match its {channels} channels"
                else:
                    deps.norms.append(node.target)
            elif isinstance(m, _POOLS) and spatial != 1:
                reason = f"pooling '{node.target}' after a flatten"
            elif isinstance(m, nn.Flatten):
                s = _is_flatten(node, channels) if spatial == 1 else None
                if s is None:
                    reason = f"flatten '{node.target}' does not keep channels contiguous"
                spatial = s
            elif not isinstance(m, _ELEMENTWISE + _POOLS):
                reason = f"it feeds unsupported module '{node.target}' ({type(m).__name__})"
        elif node.op == "call_function":
            if node.target in _ADDS:
                reason = f"it reaches a residual add ('{node.name}')"
            elif node.target in _CONCATS:
                reason = f"it reaches a concat ('{node.name}')"
            elif node.target is torch.flatten:
                s = _is_flatten(node, channels) if spatial == 1 else None
                if s is None:
                    reason = f"flatten '{node.name}' does not keep channels contiguous"
                spatial = s
            elif node.target in _POOL_FUNCTIONS and spatial != 1:
                reason = f"pooling '{node.name}' after a flatten"
            elif node.target is getattr:
                follow = False  # x.shape and the like
            elif node.target not in _ELEMENTWISE_FUNCTIONS | _POOL_FUNCTIONS or node.args[0] is not src:
                reason = f"it feeds unsupported {_describe(node)}"
        elif node.op == "call_method":
            if node.target in _METADATA_METHODS:
                follow = False
            elif node.target in _RESHAPE_METHODS:
                s = _is_flatten(node, channels) if spatial == 1 else None
                if s is None:
                    reason = f"reshape '{node.name}' does not keep channels contiguous"
                spatial = s
            elif node.target not in _ELEMENTWISE_METHODS:
                reason = f"it feeds unsupported {_describe(node)}"
        else:
            reason = f"it feeds unsupported {_describe(node)}"
        if reason is not None:
            deps.filter_reason = deps.filter_reason or reason
            return
        if follow:
            stack.extend((user, node, spatial) for user in node.users)


def _merge_of_own_paths(start: fx.Node) -> fx.Node | None:
    """An add/concat whose inputs all descend from ``start`` without crossing another merge: the
    layer's output enters a residual block through both its main path and its shortcut conv."""
    reached, stack = {start}, list(start.users)
    merges = []
    while stack:
        node = stack.pop()
        if node in reached:
            continue
        reached.add(node)
        if node.op == "call_function" and node.target in _ADDS | _CONCATS:
            merges.append(node)
            continue
        stack.extend(node.users)
    for merge in merges:
        inputs = [a for a in merge.all_input_nodes]
        if len(inputs) > 1 and all(a in reached for a in inputs):
            return merge
    return None


def _walk_backward(node: fx.Node, modules: dict, layer_names: set) -> tuple[str | None, str | None]:
    """Find the layer whose filters are ``node``'s channels: (producer name, reason if none)."""
    while True:
        if node.op == "placeholder":
            return None, "its input channels come from the model input"
        if node.op == "call_module":
            if node.target in layer_names:
                return node.target, None
            m = modules[node.target]
            if not isinstance(m, _NORMS + _POOLS + _ELEMENTWISE + (nn.Flatten,)):
                return None, f"its input comes from unsupported module '{node.target}'"
        elif node.op == "call_function":
            ok = _ELEMENTWISE_FUNCTIONS | _POOL_FUNCTIONS | {torch.flatten}
            if node.target not in ok:
                return None, f"its input comes from {_describe(node)}"
        elif node.op == "call_method":
            if node.target not in _ELEMENTWISE_METHODS | _RESHAPE_METHODS:
                return None, f"its input comes from {_describe(node)}"
        node = node.args[0]


def analyze(model: nn.Module, example_inputs: tuple) -> tuple[dict[str, LayerDeps], list[str]]:
    """Dependencies of every Conv/Linear layer, and the layers in execution order."""
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

    modules = dict(gm.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], LAYER_TYPES):
            calls.setdefault(node.target, []).append(node)
    order = list(calls)
    deps = {name: LayerDeps(name, modules[name]) for name in order}

    for name, nodes in calls.items():
        d, m = deps[name], modules[name]
        if len(nodes) > 1:
            d.filter_reason = d.channel_reason = f"the module is called {len(nodes)} times"
            continue
        if isinstance(m, nn.Linear):
            _walk_forward(gm, nodes[0], m.out_features, d)
        elif m.groups != 1:
            d.filter_reason = d.channel_reason = f"grouped/depthwise conv (groups={m.groups})"
        else:
            _walk_forward(gm, nodes[0], m.out_channels, d)
        if d.filter_reason is None and (merge := _merge_of_own_paths(nodes[0])) is not None:
            d.filter_reason = (f"its output enters a residual block through both the main path and "
                               f"the shortcut, which merge at '{merge.name}'")
        if d.filter_reason is not None:
            d.consumers, d.norms = [], []

    for name, nodes in calls.items():
        d = deps[name]
        if d.channel_reason is not None:
            continue
        producer, reason = _walk_backward(nodes[0].args[0], modules, set(order))
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
