"""PyTorch Lightning: :class:`GRegCallback` regularizes until the schedule is done, then compacts the
model in place and goes on training it (fine-tuning) in the same ``fit``.

``configure_optimizers`` returns the :class:`~greg_fast.GrowingReg` (an LR scheduler, if any, wraps
it: Lightning checks that a scheduler belongs to the optimizer it steps). When ``opt.done``, the
callback compacts the planned module (:func:`greg_fast.trainers.finish_regularization`) and gives
the trainer the smaller model's optimizer and, with ``make_scheduler``, its LR scheduler; the
regularization's scheduler is dropped. Under a DDP strategy the compacted module is wrapped again.
``Trainer(max_steps=opt.max_steps() + fine-tune steps)``.
``pip install lightning``.
"""
from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities.types import LRSchedulerConfig
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .engine import GrowingReg
from .trainers import MakeOptimizer, finish_regularization


class GRegCallback(pl.Callback):
    """``model``: the module the plan was built for (the LightningModule or one of its submodules).
    ``make_optimizer(params)``: the fine-tune optimizer (default: GrowingReg's inner one, its state cut
    to the kept channels); ``make_scheduler(optimizer)``: an LR scheduler for it, stepped every step.
    ``compacted`` says whether it has happened (a checkpoint saved after it holds the small model)."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer | None = None, make_scheduler=None):
        self.model, self.make_optimizer, self.make_scheduler = model, make_optimizer, make_scheduler
        self.compacted = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.compacted:
            return
        greg = trainer.optimizers[0] if trainer.optimizers else None
        if not isinstance(greg, GrowingReg):
            raise TypeError(f"GRegCallback needs configure_optimizers to return a greg_fast.GrowingReg, "
                            f"got {type(greg).__name__}")
        if not greg.done:
            return
        optimizer = finish_regularization(greg, self.model, self.make_optimizer)
        trainer.optimizers = [optimizer]
        schedulers = []
        if self.make_scheduler is not None:
            schedulers = [LRSchedulerConfig(self.make_scheduler(optimizer), interval="step")]
        trainer.strategy.lr_scheduler_configs = schedulers
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel):
            # its reducer syncs the gradients of the parameters it was built with, which compaction
            # replaced: wrap the compacted module again, as the strategy did at setup
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()
        self.compacted = True

    def state_dict(self) -> dict:
        return {"compacted": self.compacted}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("compacted"):
            raise ValueError("this checkpoint was saved after compaction: its weights are the small model's, which "
                             "a fresh LightningModule does not have; load it with greg_fast.load or rebuild the "
                             "small model first")

