"""One dispatcher, one policy: which implementation runs the regularization step.

``auto`` picks the fastest backend that can run on the weights' device; ``GREG_FAST_BACKEND``
overrides ``auto`` from the environment; an explicitly named backend that cannot run raises with
the reason instead of falling back.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from . import eager

ENV_VAR = "GREG_FAST_BACKEND"
# Fastest first; each entry: name -> (module, function returning why it cannot run on a device).
_BACKENDS: dict[str, tuple[ModuleType, object]] = {
    "eager": (eager, lambda device: None),
}


def backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Every known backend with ``"available"`` or the reason it cannot run on ``device``."""
    device = torch.device(device)
    return {name: why(device) or "available" for name, (_, why) in _BACKENDS.items()}


def resolve(name: str, device: torch.device) -> ModuleType:
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto")
    if name == "auto":
        return next(module for module, why in _BACKENDS.values() if why(device) is None)
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(_BACKENDS)}")
    module, why = _BACKENDS[name]
    reason = why(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    return module
