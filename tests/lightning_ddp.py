"""The Lightning module the trainer tests fit, and, run under torchrun by tests/test_trainers.py,
GRegCallback in a 2-rank DDP fit on CPU (gloo): each rank writes its final weights."""
import sys

import lightning.pytorch as pl
import torch

import greg_fast as gf
from greg_fast import data as datasets
from greg_fast.lightning import GRegCallback


class DigitsModule(pl.LightningModule):
    """A CIFAR ResNet-20 on 8x8 digits, regularized by GReg-1 (what the Lightning tests fit);
    ``scheduler``: with a StepLR of the wrapper."""

    def __init__(self, scheduler: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.scheduler = scheduler
        self.net = gf.models.create("resnet20", in_channels=1)
        self.plan = gf.plan(self.net, 0.5, example_inputs=torch.randn(1, 1, 8, 8))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        sgd = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
        self.greg = gf.GrowingReg(sgd, self.plan, method="greg1", delta=0.5, interval=1, stabilize=2)
        if not self.scheduler:
            return self.greg
        return {"optimizer": self.greg, "lr_scheduler": torch.optim.lr_scheduler.StepLR(self.greg, step_size=100)}


def main(out):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = datasets.load("digits")
    loader = torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=True)
    module = DigitsModule()
    callback = GRegCallback(module.net)
    steps = module.configure_optimizers().max_steps() + 6  # 6 after compaction
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps,
                         callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out)
    trainer.fit(module, loader)
    torch.save({"state": module.net.state_dict(), "compacted": callback.compacted, "step": trainer.global_step},
               f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
