"""What a trainer's callback does when the schedule is done, in one place for every trainer
(:mod:`greg_fast.lightning`, :class:`greg_fast.hf.GRegTrainerCallback`): compact the model in place
and hand back the optimizer to fine-tune with.

By default that is the inner optimizer of the :class:`~greg_fast.GrowingReg`, its state (momentum)
cut to the kept channels by :func:`~greg_fast.compact`: training goes on where it was, without
the penalty. ``make_optimizer(parameters)`` gives a fresh one instead (another learning rate).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .compaction import compact
from .engine import GrowingReg

MakeOptimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def finish_regularization(greg: GrowingReg, model: nn.Module, make_optimizer: MakeOptimizer | None = None
                          ) -> torch.optim.Optimizer:
    """Compact ``model`` (the module ``greg``'s plan was built for) with ``greg``'s masks, in place,
    and return the optimizer of the smaller model: ``greg``'s inner one (state cut to match) or
    ``make_optimizer(model.parameters())``. Structured plans only (unstructured masks stay masks)."""
    if not greg.done:
        raise ValueError(f"the schedule is not done (phase {greg.phase!r}): compact after opt.done")
    was_training = model.training
    compact(model.eval(), greg.masks(), greg.plan, optimizer=greg.optimizer if make_optimizer is None else None)
    model.train(was_training)
    return greg.optimizer if make_optimizer is None else make_optimizer(list(model.parameters()))
