"""Coupled channel groups, read from the model's ATen ops: every slice of every tensor that must go
when one channel goes.

The exported graph (:mod:`greg_fast.capture`) is run abstractly: every tensor gets an integer tensor
of its own shape saying which *element* (one output channel of one producer) each entry belongs
to, and a second one saying whether that entry is still exactly zero in the masked model once its
element is removed. Ops act on these the way they act on values (shape ops are applied to the id
tensor itself), and a few rules couple elements:

- add/sub/mul (residuals, squeeze-and-excitation gating ``x * s``) join the elements they combine;
- a grouped conv joins the input channels at the same place in every conv group (each conv group
  then keeps the same channels: the cut weight stays ``[out, in / groups, k]``), and a depthwise
  conv joins each input channel with its output channels;
- a reshape or chunk that splits the channel axis with a written size (channel shuffle's
  ``view(b, 2, -1, ...)``) joins the channels that differ only along that axis, so it stays true.

What each op does is one rule in the op table (:mod:`.registry`; the rules live in the family files
``layers``, ``norms``, ``arithmetic``, ``shapes``, ``reductions``); an op without one is followed only
if it is pointwise (judged by evaluating it at 0), else the channels reaching it are frozen. Joined
elements form a component; components that touch the same tensors form a group (``plan``'s unit).
A component is frozen, with a reason naming the module and the op, when a removed channel would
still change the output or its width could not follow: it reaches the model output, feeds an op
that is not understood, passes an op that maps 0 elsewhere before a consumer, is sliced or split
at written sizes, is combined with a tensor of its width that cannot be cut, or lines up with
F.pad's fixed zero channels. Channels a LayerNorm or a GroupNorm normalizes together, or that a
weight-standardized conv reads, are marked *approximate*
(the cut model computes a little differently): only ``plan(..., approximate=True)`` cuts them.

Single layers (``plan(..., coupled=False)``, the 2021 reference's rule) come from the same analysis
(:func:`analyze_layers`): a layer is one when its filters are a group that no op joins to other
channels and that only its norms and its consumers' whole input columns go with.
"""
from __future__ import annotations

import torch.nn as nn

# the family files register their rules in the op table when imported
from . import arithmetic, attention, layers, norms, reductions, shapes  # noqa: F401
from .single import Consumer, LayerDeps, analyze_layers  # noqa: F401  (the single-layer view)
from .walk import Group, collect_groups, unfiltered, walk_model


def analyze_groups(model: nn.Module, example_inputs: tuple, heads: str = "dims") -> tuple[list[Group], dict[str, str]]:
    """Every channel group of ``model`` (prunable or not, with the reason), in the order of their
    first producer; and why, for each conv/linear that runs but whose filters are in no group.
    ``heads``: attention heads keep their number and lose the same dims ("dims"), or go whole ("whole")."""
    analysis = walk_model(model, example_inputs, heads)
    groups = collect_groups(analysis)
    with_filters = {k.module for g in groups for k in g.members if k.role == "filter"}
    return groups, {n: unfiltered(n, analysis.shared) for n in analysis.layers if n not in with_filters}

