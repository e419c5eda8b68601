"""Training and evaluation loops shared by every stage of the ``greg-fast`` job."""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Data


def parse_lr_schedule(text: str) -> list[tuple[int, float]]:
    """``"0:0.01,60:0.001,90:1e-4"`` (epoch:lr, from that epoch on) or a single lr ``"0.01"``."""
    try:
        if ":" not in text:
            return [(0, float(text))]
        steps = sorted((int(e), float(lr)) for e, lr in (item.split(":") for item in text.split(",")))
    except ValueError as err:
        raise ValueError(f"learning-rate schedule {text!r} is not 'epoch:lr,epoch:lr,...' or one number") from err
    if steps[0][0] != 0:
        raise ValueError(f"learning-rate schedule {text!r} must start at epoch 0")
    if any(lr <= 0 for _, lr in steps):
        raise ValueError(f"learning-rate schedule {text!r} has a non-positive rate")
    return steps


def lr_at(schedule: list[tuple[int, float]], epoch: int) -> float:
    return [lr for start, lr in schedule if start <= epoch][-1]


def epoch_generator(seed: int, stage: str, epoch: int) -> torch.Generator:
    """Data order and augmentation depend only on (seed, stage, epoch): a resumed run sees the
    same batches as an uninterrupted one."""
    stage_id = {"pretrain": 1, "regularize": 2, "finetune": 3}[stage]
    return torch.Generator().manual_seed(seed * 1_000_003 + stage_id * 10_007 + epoch)


def batches(dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            workers: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(dataset, torch.utils.data.TensorDataset):  # in memory: slice, no per-item collate
        x, y = dataset.tensors
        order = torch.randperm(len(y), generator=generator) if shuffle else torch.arange(len(y))
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]
    else:
        yield from torch.utils.data.DataLoader(dataset, batch_size, shuffle=shuffle, generator=generator,
                                               num_workers=workers, pin_memory=torch.cuda.is_available())


def n_batches(dataset, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, device: torch.device, batch_size: int = 512) -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in batches(data.test, batch_size, shuffle=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return {"test_acc": 100.0 * correct / total, "test_loss": loss / total}


def train_epoch(model: nn.Module, data: Data, optimizer: torch.optim.Optimizer, device: torch.device, *,
                batch_size: int, generator: torch.Generator,
                after_step: Callable[[float, float], bool] | None = None) -> dict[str, float]:
    """One pass over the training set. ``after_step(loss, batch_acc)`` runs after each step and may
    return True to stop early (the regularization stage ends mid-epoch when its schedule is done)."""
    model.train()
    seen = correct = 0
    total_loss = 0.0
    for x, y in batches(data.train, batch_size, shuffle=True, generator=generator):
        if data.augment is not None:
            x = data.augment(x, generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_correct = (out.argmax(1) == y).sum()
        loss_value, acc = loss.item(), batch_correct.item() / len(y)
        total_loss += loss_value * len(y)
        correct += batch_correct.item()
        seen += len(y)
        if after_step is not None and after_step(loss_value, acc):
            break
    return {"train_loss": total_loss / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1)}
