"""The NaN guard: whether the gradients an optimizer would apply are all finite (GrowingReg skips a
step where they are not; the training loop of the job does the same for plain steps)."""
from __future__ import annotations

import torch


def finite_grads(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Whether every gradient the optimizer would apply is finite, as a 0-d bool tensor on the
    gradients' device (one fused norm, no host sync); None without gradients."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return torch.isfinite(torch.nn.utils.get_total_norm(grads, 2.0)) if grads else None


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """:func:`finite_grads` read on the host (one sync)."""
    ok = finite_grads(optimizer)
    return ok is None or bool(ok)
