"""One dispatcher, one policy: which implementation runs the regularization step.

``auto`` takes the first available backend for the weights' device (CUDA: triton, then eager;
CPU: cpp, then eager); ``GREG_FAST_BACKEND`` overrides ``auto`` from the environment; an
explicitly named backend that cannot run raises with the reason instead of falling back.
Each backend implements the step contract of :mod:`greg_fast.backend.base` (a
:class:`~greg_fast.backend.base.StepBatch` in, group scores out).
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from . import cpp, eager, triton
from .base import SGDArgs, StepBatch  # noqa: F401  (the contract, for callers)

ENV_VAR = "GREG_FAST_BACKEND"
_BACKENDS: dict[str, ModuleType] = {m.name: m for m in (triton, cpp, eager)}
_AUTO = {"cuda": ("triton", "eager"), "cpu": ("cpp", "eager")}


def backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Every known backend with ``"available"`` or the reason it cannot run on ``device``."""
    device = torch.device(device)
    return {name: m.unavailable(device) or "available" for name, m in _BACKENDS.items()}


def auto_choice(device: torch.device) -> str:
    return next(n for n in _AUTO.get(device.type, ("eager",)) if _BACKENDS[n].unavailable(device) is None)


def module(name: str) -> ModuleType:
    """The backend module of that name (no availability check)."""
    return _BACKENDS[name]


def resolve(name: str, device: torch.device) -> ModuleType:
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto")
    if name == "auto":
        return _BACKENDS[auto_choice(device)]
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(_BACKENDS)}")
    chosen = _BACKENDS[name]
    reason = chosen.unavailable(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    return chosen
