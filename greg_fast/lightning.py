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
from .io import architecture, rebuild
from .trainers import MakeOptimizer, finish_regularization


class GRegCallback(pl.Callback):
    """``model``: the module the plan was built for (the LightningModule or one of its submodules).
    ``make_optimizer(params)``: the fine-tune optimizer (default: GrowingReg's inner one, its state cut
    to the kept channels); ``make_scheduler(optimizer)``: an LR scheduler for it, stepped every step.
    ``compacted`` says whether it has happened (a checkpoint saved after it holds the small model).

    ``fit(ckpt_path=...)`` of a checkpoint saved after compaction shrinks ``model`` to the saved widths
    before Lightning loads the weights, and fine-tunes on with ``make_optimizer`` (required then:
    ``configure_optimizers`` builds a GrowingReg for the dense model) and ``make_scheduler``, whose
    saved states Lightning restores. Lightning gives callbacks no hook before it loads the weights, so
    for the fit the callback wraps the module's ``on_load_checkpoint`` and ``configure_optimizers``."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer | None = None, make_scheduler=None):
        self.model, self.make_optimizer, self.make_scheduler = model, make_optimizer, make_scheduler
        self.compacted = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        load_hook, configure = pl_module.on_load_checkpoint, pl_module.configure_optimizers

        def on_load_checkpoint(checkpoint):
            self._shrink_to(checkpoint, pl_module)
            load_hook(checkpoint)

        def configure_optimizers():
            if not self.compacted:
                return configure()
            optimizer = self.make_optimizer(list(self.model.parameters()))
            if self.make_scheduler is None:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.make_scheduler(optimizer),
                                                             "interval": "step"}}

        pl_module.on_load_checkpoint, pl_module.configure_optimizers = on_load_checkpoint, configure_optimizers

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for hook in ("on_load_checkpoint", "configure_optimizers"):
            pl_module.__dict__.pop(hook, None)

    def _shrink_to(self, checkpoint: dict, pl_module: pl.LightningModule) -> None:
        saved = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if not saved.get("compacted"):
            return
        where = "a checkpoint saved after compaction"
        if self.make_optimizer is None:
            raise ValueError(f"resuming {where} needs GRegCallback(make_optimizer=...) building the optimizer it "
                             "fine-tuned with: configure_optimizers builds a GrowingReg for the dense model")
        if (self.make_scheduler is None) != (not checkpoint.get("lr_schedulers")):
            raise ValueError(f"{where} {'has' if checkpoint.get('lr_schedulers') else 'has no'} LR scheduler state: "
                             f"give GRegCallback the make_scheduler it fine-tuned with")
        prefix = next((f"{n}." if n else "" for n, m in pl_module.named_modules() if m is self.model), None)
        if prefix is None:
            raise ValueError("GRegCallback's model is not a submodule of the LightningModule being fitted")
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        arch = saved["architecture"]
        rebuild(self.model, state, arch["widths"], arch["counts"], arch["stored"], where)
        self.compacted = True

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
        if not self.compacted:
            return {"compacted": False}
        return {"compacted": True, "architecture": architecture(self.model)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.compacted = bool(state_dict.get("compacted"))
