"""The step contract every backend implements, and the one layout rule.

A backend module provides ``name``, ``unavailable(device)``, ``scores(layers)`` and
``step(batch, *, want_scores, mask)``: one regularization step over a :class:`StepBatch`
(``grad += λ_g·w``; with ``batch.sgd`` also weight decay, momentum and the SGD update), returning
every layer's group scores when asked (``mask``: a bool, or under a capturable schedule a 0-d
bool tensor the step reads on the device). A backend whose capturable step is an op that finds
its layers by handle also provides ``capture(layers, memo)``, called once before any step.
:func:`eligible` is the only statement of which layers a compiled kernel can walk; the Triton
launcher reads it through :func:`layout` and :func:`follows`, and the C++ op checks the same
conditions, refusing with NotImplementedError. A compiled backend takes all layers first and
sorts them only on such a refusal (:func:`greg_fast.backend.fallback.run_all_first`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..units import LayerPlan

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the compiled kernels take


@dataclass(frozen=True)
class SGDArgs:
    """The SGD half of a fused step (dampening 0, no nesterov), one entry per layer (floats, or 0-d
    tensors under a capturable schedule); a buffer is None where the layer's group has no momentum.
    ``skip``: a 0-d bool tensor, True on a step the schedule skips on the device (nothing written)."""
    buffers: Sequence[torch.Tensor | None]
    lr: Sequence[float | torch.Tensor]
    momentum: Sequence[float | torch.Tensor]
    weight_decay: Sequence[float | torch.Tensor]
    skip: torch.Tensor | bool = False
    table: torch.Tensor | None = None  # the same values as one fp32 [n_layers, 3] device tensor, if held so


@dataclass(slots=True)  # built every step: slots, not frozen (a frozen init costs twice as much)
class StepBatch:
    """One step's work. ``kept[i]``: layer i's kept mask (bool ``[n_groups]``, or uint8 bits for
    unstructured layers, see greg_fast.masks); ``lam_kept`` / ``lam_selected``: fp32 ``[n_layers]``,
    the λ of its kept and of its other groups; ``sgd``: set for the fused path; ``passes``: sizes of
    consecutive runs of layers that must run one after the other (layers of one run never share an
    entry; a parameter's rows and its columns do), empty for one run; ``cross``: with passes, what
    lets a backend run them as one (per layer ``(xlam, xkeep, own)``, see SliceMap.cross; the
    passes stay the reference); ``memo``: a dict the caller keeps across steps, where a backend may
    keep host work it can reuse (None: nothing is kept)."""
    layers: Sequence[LayerPlan]
    kept: Sequence[torch.Tensor]
    lam_kept: torch.Tensor
    lam_selected: torch.Tensor
    sgd: SGDArgs | None = None
    passes: tuple[int, ...] = ()
    cross: list | None = field(default=None, repr=False, compare=False)
    memo: dict | None = field(default=None, repr=False, compare=False)  # a backend's reusable host work

    def __post_init__(self):
        if self.sgd is not None and len(self.passes) > 1:  # an entry in two slices would be updated twice
            raise ValueError("a fused SGD step updates every entry once: it cannot take slices that share entries "
                             "(passes)")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def views(self) -> list[tuple[int, int, int]]:
        return [l.view for l in self.layers]

    def subset(self, idx: Sequence[int]) -> "StepBatch":
        """The same work restricted to layers ``idx``."""
        if len(idx) == len(self.layers):
            return self
        sel = torch.tensor(idx, device=self.lam_kept.device)
        sgd = None if self.sgd is None else SGDArgs(*([getattr(self.sgd, f)[i] for i in idx]
                                                      for f in ("buffers", "lr", "momentum", "weight_decay")),
                                                    skip=self.sgd.skip,
                                                    table=None if self.sgd.table is None else self.sgd.table[sel])
        # the same order, each pass keeping the chosen layers it had
        passes = tuple(n for n in (sum(i in r for i in idx) for r in self.pass_ranges()) if n) if self.passes else ()
        return replace(self, layers=[self.layers[i] for i in idx], kept=[self.kept[i] for i in idx],
                       lam_kept=self.lam_kept[sel], lam_selected=self.lam_selected[sel], sgd=sgd, passes=passes,
                       cross=None, memo=None)

    def pass_ranges(self) -> list[range]:
        """The layer indices of each pass, in order."""
        return pass_ranges(self.passes, len(self.layers))


def pass_ranges(passes: Sequence[int], n_layers: int) -> list[range]:
    """The layer indices of each pass of sizes ``passes`` (empty: one pass over ``n_layers``)."""
    ends = list(itertools.accumulate(passes or (n_layers,)))
    return [range(lo, hi) for lo, hi in zip([0] + ends, ends)]


# ---- the layout rule ----
def layout(w: torch.Tensor, view) -> tuple | None | bool:
    """How a kernel walks weight ``w`` as the layer's ``[A, G, B]`` view: None (row-major), its
    strides (a channels_last filter layer: each filter stays one block of B elements, and the work
    inside a filter is elementwise or a sum, blind to the order; or a run of columns of a
    contiguous parameter: rows of G·B contiguous elements, :func:`outer_stride` apart), or False
    (it cannot: eager takes the layer)."""
    if w.is_contiguous():
        return None
    if (view[0] == 1 and w.dim() == 4 and w.stride(0) == view[2]
            and w.is_contiguous(memory_format=torch.channels_last)):
        return w.stride()
    if _strided_rows(w, view):
        return w.stride()
    return False


def _strided_rows(w: torch.Tensor, view) -> bool:
    """``w`` is A rows, each G·B contiguous elements, rows ``w.stride(0)`` apart (no overlap)."""
    if w.dim() < 2 or view[0] != w.shape[0] or view[0] < 2:
        return False
    expected = 1
    for size, stride in zip(reversed(w.shape[1:]), reversed(w.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return w.stride(0) >= expected


def outer_stride(w: torch.Tensor, view) -> int:
    """Elements from one row of A to the next as a kernel walks ``w`` (a walkable layout)."""
    return w.stride(0) if view[0] > 1 and not w.is_contiguous() else view[1] * view[2]


def follows(t: torch.Tensor | None, w_layout, dtype: torch.dtype) -> bool:
    """Whether a gradient or momentum buffer can be walked alongside its weight: same dtype and
    the same layout."""
    if t is None or t.dtype is not dtype:
        return False
    return t.is_contiguous() if w_layout is None else t.stride() == w_layout


def eligible(layer: LayerPlan, buffer: torch.Tensor | None = None) -> bool:
    """Can a compiled backend take this layer (and its momentum buffer)?"""
    w = layer.weight
    w_layout = layout(w, layer.view)
    return (w.dtype in DTYPES and w_layout is not False and follows(layer.grad, w_layout, w.dtype)
            and (buffer is None or follows(buffer, w_layout, w.dtype)))


# ---- the score buffer a compiled backend fills ----
def score_buffer(batch: StepBatch, want_scores: bool, device) -> torch.Tensor:
    """One fp32 buffer for every group of every layer (empty when no scores are wanted)."""
    n = sum(l.n_groups for l in batch.layers) if want_scores else 0
    return torch.empty(n, dtype=torch.float32, device=device)


def split_scores(scores: torch.Tensor, layers: Sequence[LayerPlan]) -> list[torch.Tensor]:
    return list(scores.split([l.n_groups for l in layers]))
