"""Compact formats for unstructured (``weight``-granularity) pruned weights.

- ``csr``: the weight viewed as ``[out, -1]``: ``crow_indices`` (int64, out+1), ``col_indices``
  (int64) and the kept ``values``.
- ``bitmap``: one bit per weight (bit k of byte b is element 8b+k) and the kept ``values`` in order.

Packing runs in the C++ extension when built (``pack_reference`` is the PyTorch twin the tests
compare it with); unpacking is exact. Packed weights are dicts of tensors, ints and strings, so
they save and load with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from . import ops
from .masks import expand_groups, pack_bits, unpack_bits
from .result import Plan

FORMATS = ("csr", "bitmap")


def _check(weight: torch.Tensor, mask: torch.Tensor | None, format: str) -> torch.Tensor:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if weight.dim() < 1:
        raise ValueError("cannot pack a 0-d tensor")
    if mask is None:
        return weight != 0
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return mask


def _header(weight: torch.Tensor, format: str) -> dict:
    return {"format": format, "shape": list(weight.shape)}


def pack_reference(weight: torch.Tensor, mask: torch.Tensor | None = None, format: str = "bitmap") -> dict:
    """Pure-PyTorch packing, the reference for :func:`pack`."""
    mask = _check(weight, mask, format)
    w = weight.detach().cpu().contiguous()
    m = mask.cpu().contiguous()
    if format == "bitmap":
        flat = m.reshape(-1)
        return {**_header(weight, format), "bits": pack_bits(flat), "values": w.reshape(-1)[flat]}
    w2, m2 = w.reshape(w.shape[0], -1), m.reshape(m.shape[0], -1)
    crow = torch.zeros(w2.shape[0] + 1, dtype=torch.int64)
    crow[1:] = m2.sum(1).cumsum(0)
    return {**_header(weight, format), "crow_indices": crow, "col_indices": m2.nonzero()[:, 1].contiguous(),
            "values": w2[m2]}


def pack(weight: torch.Tensor, mask: torch.Tensor | None = None, format: str = "bitmap") -> dict:
    """Pack the kept entries of ``weight`` (``mask`` True = kept; default: the nonzero entries)."""
    mask = _check(weight, mask, format)
    if ops.unavailable() is not None:
        return pack_reference(weight, mask, format)
    w = weight.detach().cpu().contiguous()
    m = mask.cpu().contiguous()
    if format == "bitmap":
        bits, values = ops.pack_bitmap(w.reshape(-1), m.reshape(-1))
        return {**_header(weight, format), "bits": bits, "values": values}
    crow, col, values = ops.pack_csr(w.reshape(w.shape[0], -1), m.reshape(m.shape[0], -1))
    return {**_header(weight, format), "crow_indices": crow, "col_indices": col, "values": values}


def unpack(packed: Mapping) -> torch.Tensor:
    """The dense weight back, removed entries zero."""
    shape, values = list(packed["shape"]), packed["values"]
    numel = 1
    for s in shape:
        numel *= s
    if packed["format"] == "bitmap":
        bits = packed["bits"]
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != -(-numel // 8):
            raise ValueError(f"corrupt bitmap pack: {bits.numel()} bytes of {bits.dtype} bits for a weight of "
                             f"{numel} entries (expected {-(-numel // 8)} uint8)")
        mask = unpack_bits(bits, numel)
        if int(mask.sum()) != values.numel():
            raise ValueError(f"corrupt bitmap pack: the bits keep {int(mask.sum())} entries, "
                             f"there are {values.numel()} values")
        out = torch.zeros(numel, dtype=values.dtype)
        out[mask] = values
        return out.view(shape)
    if packed["format"] == "csr":
        rows, crow, col = shape[0], packed["crow_indices"], packed["col_indices"]
        counts = crow.diff()
        if len(crow) != rows + 1 or crow[0] != 0 or bool((counts < 0).any()) or crow[-1] != len(values) \
                or len(col) != len(values) or (len(col) and not 0 <= int(col.min()) <= int(col.max()) < numel // rows):
            raise ValueError("corrupt CSR pack: crow_indices, col_indices and values do not agree with the shape")
        dense = torch.zeros(rows, numel // rows, dtype=values.dtype)
        dense[torch.repeat_interleave(torch.arange(rows), counts), col] = values
        return dense.view(shape)
    raise ValueError(f"unknown packed format {packed.get('format')!r}")


def nbytes(packed: Mapping) -> int:
    """Bytes of the packed tensors."""
    return sum(v.numel() * v.element_size() for v in packed.values() if isinstance(v, torch.Tensor))


def pack_model(model: nn.Module, masks: Mapping[str, torch.Tensor], plan: Plan, format: str = "bitmap") -> dict:
    """Pack every planned layer's weight under its mask: ``{"layers": {name: packed},
    "bytes_dense": ..., "bytes_packed": ...}`` (dense: those weights stored as they are)."""
    plan.check_model(model)
    layers, dense = {}, 0
    for layer in plan.layers:
        if layer.name not in masks:
            continue
        w = layer.weight
        mask = expand_groups(layer, masks[layer.name].to(w.device).reshape(-1)).expand_as(w)
        layers[layer.name] = pack(w, mask.contiguous(), format)
        dense += w.numel() * w.element_size()
    return {"layers": layers, "bytes_dense": dense, "bytes_packed": sum(nbytes(p) for p in layers.values())}
