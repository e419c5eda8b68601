"""What the walk computes for every tensor of the graph, and the small helpers every rule uses.

A :class:`Val` holds, for each entry of a tensor, the *element* it belongs to (one output channel of
one producer, or :data:`NONE`) and whether the entry is still exactly zero in the masked model once
its element is removed (``lost``: 0, or the index of the reason why not).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .registry import IDENTITY

NONE = -1  # an entry of no prunable channel


@dataclass
class Val:
    ids: torch.Tensor   # int64, the tensor's shape: element of every entry, or NONE
    lost: torch.Tensor  # int32, same shape: 0 while a removed element's entry is exactly zero, else a reason
    sources: frozenset = frozenset()  # parameters/buffers it is computed from alone (none for activations)
    pos: torch.Tensor | None = None   # a view of one parameter: the flat index of each entry in it
    view_of: fx.Node | None = None    # a view of one parameter: the view that wrote its sizes (stored widths)

    @property
    def param(self) -> str | None:
        """The parameter this is a view of, if it is one."""
        return next(iter(self.sources)) if self.pos is not None and len(self.sources) == 1 else None


def unique_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The distinct pairs ``(a[i], b[i])`` of integer tensors, ``[n, 2]`` in sorted order: one int64
    key per pair, as a 1-d unique is many times faster than ``unique(dim=0)``."""
    if not a.numel():
        return torch.empty(0, 2, dtype=torch.int64)
    a, b = a.long(), b.long()
    a0, b0 = int(a.min()), int(b.min())
    m = int(b.max()) - b0 + 1
    keys = torch.unique((a - a0) * m + (b - b0))
    return torch.stack([keys // m + a0, keys % m + b0], 1)


def varies(ids: torch.Tensor, dim: int) -> bool:
    return ids.shape[dim] > 1 and not bool((ids == ids.narrow(dim, 0, 1)).all())


def along(ids: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The ids along ``dim`` when they are the same at every index of the other axes, else None."""
    rows = ids.movedim(dim, -1).reshape(-1, ids.shape[dim])
    return rows[0].clone() if bool((rows == rows[0]).all()) else None


def line(ids: torch.Tensor, axis: int) -> torch.Tensor:
    """The ids along ``axis`` at index 0 of every other axis."""
    return ids.movedim(axis, -1).reshape(-1, ids.shape[axis])[0]


def broadcast(ids: torch.Tensor, shape: tuple, d: int) -> bool:
    """Whether a tensor of ``ids``' shape is broadcast along axis ``d`` of the result ``shape``."""
    pad = len(shape) - ids.dim()
    return shape[d] > 1 and (d < pad or ids.shape[d - pad] == 1)


def bind(node: fx.Node) -> dict:
    """The op's arguments by their schema names, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def op_name(node: fx.Node) -> str | None:
    """The ATen op's name without its overload (``add`` for ``aten.add.Tensor``), or None for
    anything else (a higher-order op such as ``torch.autocast``, a Python function)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.name.startswith("aten::"):
        return None
    return schema.name[len("aten::"):]


def meta_shape(meta) -> tuple | None:
    return tuple(meta.shape) if isinstance(meta, torch.Tensor) else None


def writes_first_argument(node: fx.Node) -> bool:
    """An in-place op (``add_``): later readers of its first argument read its result."""
    schema = getattr(node.target, "_schema", None)
    first = schema.arguments[0] if schema is not None and schema.arguments else None
    return first is not None and first.alias_info is not None and first.alias_info.is_write


def move(node: fx.Node, name: str, t: torch.Tensor) -> torch.Tensor:
    """Apply a shape op (:data:`~greg_fast.groups.registry.MOVEMENT`) to an id (or position) tensor
    as it is applied to the value."""
    shape = meta_shape(node.meta["val"])
    if name in IDENTITY:
        return t
    if name in ("view", "_unsafe_view", "reshape", "reshape_as", "view_as", "flatten", "unflatten"):
        return t.reshape(shape)
    if name == "expand_as":
        return t.expand(shape)
    return node.target(t, *node.args[1:], **node.kwargs).contiguous()
