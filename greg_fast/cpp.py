"""The C++ backend (csrc/greg_fast.cpp): one call for all layers of CPU tensors, OpenMP over
(layer, block of groups), fp32 accumulation for fp32 / bf16 / fp16 weights."""
from __future__ import annotations

import importlib
import importlib.util

import torch

from . import eager, native

name = "cpp"
_REBUILD = ("reinstall with `pip install --no-build-isolation .` (add -e for a checkout) so that the build "
            "sees the installed torch")


def _load_extension() -> str | None:
    """Import greg_fast._C (it registers torch.ops.greg_fast.*); the reason when it cannot be."""
    if importlib.util.find_spec("greg_fast._C") is None:
        # an isolated build (plain `pip install .`) has no torch to compile against, so it builds none
        return f"the C++ extension was not built: {_REBUILD}"
    try:
        importlib.import_module("greg_fast._C")
    except ImportError as err:  # typically built against another torch: undefined symbols
        return f"the C++ extension was built but does not load ({err}): {_REBUILD}"
    return None


_IMPORT_ERROR = _load_extension()  # a missing build must never break `import greg_fast`


def unavailable(device: torch.device) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type != "cpu":
        return f"it runs on CPU tensors only, the weights are on {device}"
    return None


def scores(layers) -> list[torch.Tensor]:
    layers = list(layers)
    if not layers:
        return []
    out = native.score_buffer(layers, True, "cpu")
    try:
        torch.ops.greg_fast.scores_([l.weight.detach() for l in layers], native.flat_views(layers), out)
    except (RuntimeError, TypeError):  # a layout the op refuses: see native.walkable
        return eager.scores(layers)
    return native.split_scores(out, layers)


def _penalty(layers, kept, lam_kept, lam_selected, *, want_scores, mask):
    out = native.score_buffer(layers, want_scores, "cpu")
    torch.ops.greg_fast.penalty_([l.weight for l in layers], [l.weight.grad for l in layers], kept,
                                 lam_kept, lam_selected, native.flat_views(layers), mask, out)
    return native.split_scores(out, layers) if want_scores else None


def _fused_sgd(layers, kept, lam_kept, lam_selected, buffers, lr, momentum, weight_decay, *, want_scores, mask):
    out = native.score_buffer(layers, want_scores, "cpu")
    empty = torch.empty(0)
    torch.ops.greg_fast.fused_sgd_([l.weight for l in layers], [l.weight.grad for l in layers],
                                   [b if b is not None else empty for b in buffers], kept, lam_kept,
                                   lam_selected, list(map(float, lr)), list(map(float, momentum)),
                                   list(map(float, weight_decay)), native.flat_views(layers), mask, out)
    return native.split_scores(out, layers) if want_scores else None


# The op checks every tensor before writing any (a refusal is a RuntimeError or TypeError).
_REFUSED = (RuntimeError, TypeError)


def penalty(layers, kept, lam_kept, lam_selected, *, want_scores, mask):
    return native.run_all_first(_penalty, eager.penalty, _REFUSED, layers, kept, lam_kept, lam_selected,
                                want_scores=want_scores, mask=mask)


def fused_sgd(layers, kept, lam_kept, lam_selected, buffers, lr, momentum, weight_decay, *, want_scores, mask):
    return native.run_all_first(_fused_sgd, eager.fused_sgd, _REFUSED, layers, kept, lam_kept, lam_selected, buffers,
                                lr, momentum, weight_decay, want_scores=want_scores, mask=mask)
