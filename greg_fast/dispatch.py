"""One dispatcher, one policy: which implementation runs the regularization step.

``auto`` takes the first available backend for the weights' device (CUDA: triton, then eager;
CPU: cpp, then eager); ``GREG_FAST_BACKEND`` overrides ``auto`` from the environment; an
explicitly named backend that cannot run raises with the reason instead of falling back.
A backend module provides ``name``, ``scores``, ``penalty`` and ``fused_sgd`` as in greg_fast.eager.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from . import cpp, eager, triton_backend

ENV_VAR = "GREG_FAST_BACKEND"
_BACKENDS: dict[str, tuple[ModuleType, object]] = {  # name -> (module, why it cannot run on a device)
    "triton": (triton_backend, triton_backend.unavailable),
    "cpp": (cpp, cpp.unavailable),
    "eager": (eager, lambda device: None),
}
_AUTO = {"cuda": ("triton", "eager"), "cpu": ("cpp", "eager")}


def backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Every known backend with ``"available"`` or the reason it cannot run on ``device``."""
    device = torch.device(device)
    return {name: why(device) or "available" for name, (_, why) in _BACKENDS.items()}


def auto_choice(device: torch.device) -> str:
    return next(n for n in _AUTO.get(device.type, ("eager",)) if _BACKENDS[n][1](device) is None)


def module(name: str) -> ModuleType:
    """The backend module of that name (no availability check)."""
    return _BACKENDS[name][0]


def resolve(name: str, device: torch.device) -> ModuleType:
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto")
    if name == "auto":
        return _BACKENDS[auto_choice(device)][0]
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(_BACKENDS)}")
    module, why = _BACKENDS[name]
    reason = why(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    return module
