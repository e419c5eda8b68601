"""The C++ backend (csrc/greg_fast.cpp through greg_fast.ops): one call for all layers of CPU
tensors, OpenMP over (layer, block of groups), fp32 accumulation for fp32 / bf16 / fp16 weights.

All layers go into one call first (fallback.run_all_first): the op checks every tensor before it
writes anything and refuses a dtype or layout it cannot walk with NotImplementedError. Any other
error from the op is a bug and propagates."""
from __future__ import annotations

import torch

from .. import ops
from . import base, eager, fallback

name = "cpp"


def unavailable(device: torch.device) -> str | None:
    missing = ops.unavailable()
    if missing is not None:
        return missing
    if device.type != "cpu":
        return f"it runs on CPU tensors only, the weights are on {device}"
    return None


def scores(layers) -> list[torch.Tensor]:
    layers = list(layers)
    if not layers:
        return []
    out = torch.empty(sum(l.n_groups for l in layers), dtype=torch.float32)
    try:
        ops.scores_([l.weight.detach() for l in layers], [l.view for l in layers], out)
    except NotImplementedError:  # a dtype or layout the op refuses (only at selections: not per step)
        return eager.scores(layers)
    return base.split_scores(out, layers)


def _hyper(sgd: base.SGDArgs, memo: dict | None) -> torch.Tensor:
    """The op's [n_layers, 3] lr / momentum / weight decay, built again only when a value changed."""
    values = (tuple(sgd.lr), tuple(sgd.momentum), tuple(sgd.weight_decay))
    if memo is None or torch.compiler.is_compiling() or any(isinstance(v, torch.Tensor) for col in values for v in col):
        return ops.sgd_hyper(*values)  # tensors: read by the op; compiled: a constant of the graph
    cached = memo.get("cpp_hyper")
    if cached is None or cached[0] != values:
        cached = memo["cpp_hyper"] = (values, ops.sgd_hyper(*values))
    return cached[1]


def _step(batch: base.StepBatch, *, want_scores: bool, mask: bool):
    out = base.score_buffer(batch, want_scores, "cpu")
    weights = [l.weight for l in batch.layers]
    grads = [l.grad for l in batch.layers]
    if any(g is None for g in grads):
        raise NotImplementedError("a layer without a gradient")  # eager handles those
    if batch.sgd is None:
        ops.penalty_(weights, grads, batch.kept, batch.lam_kept, batch.lam_selected, batch.views, mask=mask,
                     scores=out, passes=batch.passes)
    else:
        sgd = batch.sgd
        ops.fused_sgd_(weights, grads, sgd.buffers, batch.kept, batch.lam_kept, batch.lam_selected, batch.views,
                       hyper=_hyper(sgd, batch.memo), mask=mask, skip=sgd.skip, scores=out)
    return base.split_scores(out, batch.layers) if want_scores else None


def step(batch: base.StepBatch, *, want_scores: bool, mask: bool):
    return fallback.run_all_first(_step, NotImplementedError, batch, want_scores=want_scores, mask=mask)
