"""Training and evaluation loops shared by every stage of the ``greg-fast`` job."""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Data
from .guard import grads_finite


def parse_lr_schedule(text: str) -> list[tuple[int, float]]:
    """``"0:0.01,60:0.001,90:1e-4"`` (epoch:lr, from that epoch on) or a single lr ``"0.01"``."""
    try:
        if ":" not in text:
            steps = [(0, float(text))]
        else:
            steps = sorted((int(e), float(lr)) for e, lr in (item.split(":") for item in text.split(",")))
    except ValueError as err:
        raise ValueError(f"learning-rate schedule {text!r} is not 'epoch:lr,epoch:lr,...' or one number") from err
    if steps[0][0] != 0:
        raise ValueError(f"learning-rate schedule {text!r} must start at epoch 0")
    if any(not lr > 0 or not math.isfinite(lr) for _, lr in steps):
        raise ValueError(f"learning-rate schedule {text!r} has a rate that is not a finite number > 0")
    return steps


def lr_at(schedule: list[tuple[int, float]], epoch: int) -> float:
    return [lr for start, lr in schedule if start <= epoch][-1]


def epoch_generator(seed: int, stage: str, epoch: int, batch: int | None = None) -> torch.Generator:
    """Data order (per epoch) and augmentation (per batch) depend only on (seed, stage, epoch,
    batch): a run resumed mid-epoch sees the same batches as an uninterrupted one."""
    stage_id = {"pretrain": 1, "regularize": 2, "finetune": 3}[stage]
    key = seed * 1_000_003 + stage_id * 10_007 + epoch
    if batch is not None:
        key = key * 100_003 + batch + 1
    return torch.Generator().manual_seed(key % (2 ** 63))


def distributed_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """``name`` as a torch.device (None: cuda if available, else cpu), refusing one this machine
    does not have with the devices it does have (torch's own error is a raw driver message)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{flag} {name}: not a device name ({err}); try cpu or cuda") from None
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cpu" or device.type == "cuda" and (device.index or 0) < cuda:
        return device
    what = "no CUDA device is available" if device.type == "cuda" and cuda == 0 else f"no device {device}"
    have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(cuda))])
    raise ValueError(f"{flag} {name}: {what} on this machine; available: {have}")


def loader_workers() -> int:
    """DataLoader worker processes: up to 4, leaving one of the CPUs this process may use to the
    training loop (more workers than CPUs only slows both, and the DataLoader warns about it)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def batches(dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(dataset, torch.utils.data.TensorDataset):  # in memory: slice, no per-item collate
        x, y = dataset.tensors
        order = torch.randperm(len(y), generator=generator) if shuffle else torch.arange(len(y))
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]
    else:
        yield from torch.utils.data.DataLoader(dataset, batch_size, shuffle=shuffle, generator=generator,
                                               num_workers=loader_workers() if workers is None else workers,
                                               pin_memory=torch.cuda.is_available())


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
                batch_size: int, seed: int, stage: str, epoch: int, start_batch: int = 0,
                sums: dict | None = None, after_step: Callable[[int, dict], bool] | None = None,
                max_skipped_in_a_row: int = 100) -> dict:
    """Batches ``start_batch..`` of one epoch. A step whose gradients are not finite is skipped and
    counted (never applied, BatchNorm statistics restored). ``sums`` carries the epoch's running
    totals across a resume; ``after_step(next_batch, sums)`` runs after each batch and may return
    True to stop early. Under torch.distributed each rank trains on its slice of every global batch
    (``batch_size`` is the global batch), so the averaged gradient is the global batch's. After
    ``max_skipped_in_a_row`` skipped steps in a row it raises: training has diverged, and a
    schedule that counts steps would never end."""
    model.train()
    rank, world = distributed_rank_world()
    sums = dict(sums or {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0})
    # BatchNorm statistics move in the forward pass: a skipped step must not keep them
    stats = [b for b in model.buffers() if b.is_floating_point()]
    order = epoch_generator(seed, stage, epoch)
    for i, (x, y) in enumerate(batches(data.train, batch_size, shuffle=True, generator=order)):
        if i < start_batch:
            continue
        if data.augment is not None:
            x = data.augment(x, epoch_generator(seed, stage, epoch, i))
        if world > 1:
            part = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
            x, y = x[part], y[part]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        saved = torch._foreach_mul(stats, 1.0) if stats else []
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grads_finite(optimizer):
            optimizer.step()
            sums["skip_streak"] = 0
        else:
            sums["skipped"] += 1
            sums["skip_streak"] = sums.get("skip_streak", 0) + 1
            if stats:
                torch._foreach_copy_(stats, saved)
            if sums["skip_streak"] >= max_skipped_in_a_row:
                raise RuntimeError(f"{stage}: {sums['skip_streak']} steps in a row had non-finite gradients and "
                                   "were skipped: training has diverged (lower the learning rate or delta, or "
                                   "raise --max-skipped-steps)")
        sums["last_loss"] = loss.item()
        sums["last_acc"] = (out.argmax(1) == y).float().mean().item()
        if math.isfinite(sums["last_loss"]):
            sums["loss"] += sums["last_loss"] * len(y)
        sums["correct"] += round(sums["last_acc"] * len(y))
        sums["seen"] += len(y)
        if after_step is not None and after_step(i + 1, sums):
            break
    return sums


def epoch_metrics(sums: dict) -> dict[str, float]:
    seen = max(sums["seen"], 1)
    return {"train_loss": sums["loss"] / seen, "train_acc": 100.0 * sums["correct"] / seen,
            "skipped_steps": sums["skipped"]}
