"""Every op of the C++ extension (csrc/greg_fast.cpp, ``torch.ops.greg_fast.*``), wrapped once:
whether the extension loads (and why not), and keyword-argument wrappers around the raw ops. The
cpp backend, compaction and sparse export call these, never the raw ops."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Sequence

import torch

_REBUILD = ("reinstall with `pip install --no-build-isolation .` (add -e for a checkout) so that the build "
            "sees the installed torch")


def _load_extension() -> str | None:
    """Import greg_fast._C (it registers the ops); the reason when it cannot be."""
    if importlib.util.find_spec("greg_fast._C") is None:
        # an isolated build (plain `pip install .`) has no torch to compile against, so it builds none
        return f"the C++ extension was not built: {_REBUILD}"
    try:
        importlib.import_module("greg_fast._C")
    except ImportError as err:  # typically built against another torch: undefined symbols
        return f"the C++ extension was built but does not load ({err}): {_REBUILD}"
    return None


_IMPORT_ERROR = _load_extension()  # a missing build must never break `import greg_fast`
_C = importlib.import_module("greg_fast._C") if _IMPORT_ERROR is None else None


def _register_fakes() -> None:
    """Fake (meta) kernels for the step ops, so that torch.compile traces them without running them:
    each only writes into tensors it is given, so each returns nothing."""
    def writes_in_place(*args, **kwargs) -> None:
        return None
    for name in ("scores_", "penalty_", "fused_sgd_"):
        torch.library.register_fake(f"greg_fast::{name}", writes_in_place)


if _IMPORT_ERROR is None:
    _register_fakes()


def unavailable() -> str | None:
    """Why the C++ ops cannot run (None: they can)."""
    return _IMPORT_ERROR


def launch_state(dicts: list, names: list, tensors: list):
    """What a kernel launch bakes in, read every step to see whether a cached launch still holds:
    the address, dtype and strides of each ``dicts[i][names[i]]`` (a module's parameter, looked up
    now, so a replaced parameter counts) and of its ``.grad``, then of each of ``tensors`` (None
    allowed). Equal results mean an equal state. One C++ call for a whole model when the extension
    is built (about 5 µs for ResNet-50's 33 regularized layers on the development CPU)."""
    if _C is not None:
        return _C.launch_state(dicts, names, tensors)
    params = [d.get(n) for d, n in zip(dicts, names)]
    return (tuple((_tensor_state(p), None if p is None else _tensor_state(p.grad)) for p in params),
            tuple(map(_tensor_state, tensors)))


def _tensor_state(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), t.dtype, t.stride())


def flat_views(views: Sequence[tuple[int, int, int]]) -> list[int]:
    return [v for view in views for v in view]


def scores_(weights: Sequence[torch.Tensor], views, out: torch.Tensor) -> None:
    """``out`` (fp32 [sum G]) = mean |w| of every group of every layer."""
    torch.ops.greg_fast.scores_(list(weights), flat_views(views), out)


_FLAGS = {}  # the constant flag tensors of host-decided steps, made once per device


def flag(value, device: torch.device | str = "cpu") -> torch.Tensor:
    """A 0-d bool tensor: ``value`` as is when it is one (a capturable schedule's flag, read by
    the op itself, never on the host), else a cached constant on ``device``."""
    if isinstance(value, torch.Tensor):
        return value
    key = (bool(value), str(device))
    if key not in _FLAGS:
        _FLAGS[key] = torch.tensor(key[0], device=device)
    return _FLAGS[key]


def sgd_hyper(lr, momentum, weight_decay, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 ``[n_layers, 3]`` (lr, momentum, weight decay) on ``device``, from floats or 0-d
    tensors (a tensor learning rate changes without a recompile)."""
    if not any(isinstance(v, torch.Tensor) for v in (*lr, *momentum, *weight_decay)):
        return torch.tensor(list(zip(lr, momentum, weight_decay)), dtype=torch.float32, device=device).view(-1, 3)
    cols = [torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in col])
            for col in (lr, momentum, weight_decay)]
    return torch.stack(cols, 1)


def penalty_(weights, grads, kept, lam_kept, lam_selected, views, *, mask, scores: torch.Tensor,
             passes: Sequence[int] = ()) -> None:
    """``grad += λ_g·w`` for all layers in one call (``mask``, a bool or a 0-d bool tensor: zero the
    removed groups instead); group scores into ``scores`` unless it is empty. ``passes``: sizes of
    consecutive runs of layers that run one after the other (layers that share entries must not be
    in one run)."""
    torch.ops.greg_fast.penalty_(list(weights), list(grads), list(kept), lam_kept, lam_selected,
                                 flat_views(views), flag(mask), scores, list(passes))


def fused_sgd_(weights, grads, buffers, kept, lam_kept, lam_selected, views, *, hyper: torch.Tensor,
               mask, skip=False, scores: torch.Tensor) -> None:
    """Penalty, weight decay, momentum and the SGD update of all layers in one call (a missing
    momentum buffer is None; ``hyper``: :func:`sgd_hyper`). ``skip`` (a bool or 0-d bool tensor):
    write nothing, the step of non-finite gradients a capturable schedule skips."""
    empty = torch.empty(0)
    torch.ops.greg_fast.fused_sgd_(list(weights), list(grads), [b if b is not None else empty for b in buffers],
                                   list(kept), lam_kept, lam_selected, hyper, flat_views(views), flag(mask),
                                   flag(skip), scores)


def gather(tensors, rows, cols) -> list[torch.Tensor]:
    """``t[rows][:, cols]`` of many tensors in one call (an empty index keeps the whole axis)."""
    return list(torch.ops.greg_fast.gather(list(tensors), list(rows), list(cols)))


def pack_bitmap(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits, kept values) of a flat weight under a flat bool mask."""
    return torch.ops.greg_fast.pack_bitmap(weight, mask)


def pack_csr(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow_indices, col_indices, values) of a 2-d weight under a bool mask."""
    return torch.ops.greg_fast.pack_csr(weight, mask)
