"""Ops that read a width the cut changes, computed after compaction with the width the masked model had.

A LayerNorm, a GroupNorm or a mean over channels divides by the number of channels, and
``scaled_dot_product_attention`` scales by the head size it is given. In the masked model the
removed channels are zeros that still count; in the compacted model they are gone. So that the
compacted model computes exactly what the masked one did, the module that calls such an op is given
its :class:`Count` records: while its ``forward`` runs, a torch function mode catches the call and
computes it with the original count (mean and variance over the kept channels, divided by the
original number; the original head size's scale). Everything else in the module runs as written, so
a timm ``LayerNorm2d`` keeps its permutes. The result is plain ATen ops: ``torch.export``, ONNX export
and ``torch.compile`` see them like any others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

OPS = ("layer_norm", "group_norm", "mean", "scaled_dot_product_attention")  # what a Count can name


@dataclass(frozen=True)
class Count:
    """The op ``op`` of one module reads ``kept`` entries along ``axis`` where the masked model had
    ``width``."""
    op: str
    axis: int
    kept: int
    width: int

    def as_list(self) -> list:
        return [self.op, self.axis, self.kept, self.width]


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _normalize(x: torch.Tensor, dims: tuple[int, ...], count: int, eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` as if ``count`` entries were there, the
    missing ones zeros: mean = sum / count, var = (sum of squared deviations + missing * mean²) / count."""
    xs = x.to(_stats_dtype(x))
    present = math.prod(x.shape[d] for d in dims)
    mean = xs.sum(dims, keepdim=True) / count
    d = xs - mean
    var = (d.square().sum(dims, keepdim=True) + (count - present) * mean.square()) / count
    return (d * torch.rsqrt(var + eps)).to(x.dtype)


def _layer_norm(c: Count, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if len(normalized_shape) != 1 or x.shape[-1] != c.kept or c.axis != x.dim() - 1:
        return NotImplemented
    y = _normalize(x, (-1,), c.width, eps)
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def _group_norm(c: Count, x, num_groups, weight=None, bias=None, eps=1e-5):
    if c.axis != 1 or x.shape[1] != c.kept or c.kept % num_groups or c.width % num_groups:
        return NotImplemented
    spatial = math.prod(x.shape[2:])
    grouped = x.reshape(x.shape[0], num_groups, -1)
    y = _normalize(grouped, (-1,), c.width // num_groups * spatial, eps).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = y * weight.view(shape) if weight is not None else y
    return y + bias.view(shape) if bias is not None else y


def _mean(c: Count, x, dim=None, keepdim=False, *, dtype=None):
    dims = [dim] if isinstance(dim, int) else list(dim or [])
    if len(dims) != 1 or dims[0] % x.dim() != c.axis or x.shape[c.axis] != c.kept:
        return NotImplemented
    return x.sum(dims, keepdim=keepdim, dtype=dtype) / c.width


def _attention(c: Count, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    if scale is not None or query.shape[-1] != c.kept:
        return NotImplemented
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                          scale=c.width ** -0.5, **kw)


_FUNCTIONS = {F.layer_norm: ("layer_norm", _layer_norm), torch.layer_norm: ("layer_norm", _layer_norm),
              F.group_norm: ("group_norm", _group_norm), torch.group_norm: ("group_norm", _group_norm),
              torch.mean: ("mean", _mean), torch.Tensor.mean: ("mean", _mean),
              F.scaled_dot_product_attention: ("scaled_dot_product_attention", _attention)}


class _OriginalCounts(TorchFunctionMode):
    def __init__(self, counts: list[Count]):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _FUNCTIONS.get(func)
        if entry is not None:
            for c in self.counts:
                if c.op == entry[0]:
                    out = entry[1](c, *args, **kwargs)
                    if out is not NotImplemented:
                        return out
        return func(*args, **kwargs)


class KeepsCounts:
    """Mixed into a module's class by :func:`keep_counts`: its forward runs with its ops' original
    counts. Pickles, deep-copies and prints as the module it was made from."""

    greg_counts: list[Count]

    def forward(self, *args, **kwargs):
        with _OriginalCounts(self.greg_counts):
            return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        return (_new_keeping_counts, (_base(type(self)),), self.__dict__)

    def _get_name(self):  # repr(model) shows the class the user knows
        return _base(type(self)).__name__


_CLASSES: dict[type, type] = {}


def _base(cls: type) -> type:
    return cls.__mro__[2]  # (the made class, KeepsCounts, the module's own class, ...)


def _class_for(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(base.__name__, (KeepsCounts, base), {"__module__": base.__module__,
                                                                   "__qualname__": base.__qualname__})
    return _CLASSES[base]


def _new_keeping_counts(base: type):
    cls = _class_for(base)
    return cls.__new__(cls)


def keep_counts(module: nn.Module, counts: list[Count]) -> None:
    """Make ``module``'s ops named by ``counts`` compute with the masked model's widths (added to
    any it keeps already)."""
    if not counts:
        return
    if not isinstance(module, KeepsCounts):
        module.__class__ = _class_for(type(module))
        module.greg_counts = []
    module.greg_counts = module.greg_counts + [c for c in counts if c not in module.greg_counts]


def counts_of(model: nn.Module) -> dict[str, list[list]]:
    """``{module name: [[op, axis, kept, width], ...]}`` for every module that keeps counts (what a
    saved model records, so that :func:`keep_counts` can be applied again on load)."""
    return {name: [c.as_list() for c in m.greg_counts] for name, m in model.named_modules()
            if isinstance(m, KeepsCounts)}
