"""The job's checkpoints: what a resumed run needs besides tensors (:class:`RunState`), the newest
checkpoint that loads, and the settings a run was started with."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class RunState:
    """Everything a resumed run needs besides model and optimizer tensors."""
    stage: str = "pretrain"
    epoch: int = 0                       # next epoch to run within the stage
    batch: int = 0                       # next batch of that epoch
    step: int = 0                        # steps done in the stage
    sums: dict | None = None             # running totals of the unfinished epoch
    saves: int = 0                       # checkpoints written
    skipped_steps: int = 0               # steps skipped for non-finite gradients
    records: list = field(default_factory=list)
    trace: list = field(default_factory=list)
    phase_changes: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("ckpt-*.pt"))


def load_latest(out: Path, device, report: bool = True) -> dict:
    """The newest checkpoint that loads completely (a torn or corrupt file falls back to the one
    before, said on stderr with ``report``)."""
    paths = checkpoints(out)
    if not paths:
        raise FileNotFoundError(f"--resume {out}: no checkpoints/ckpt-*.pt there")
    errors = []
    for path in reversed(paths):
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
            if isinstance(obj, dict) and {"identity", "state", "model", "optimizer", "rng"} <= obj.keys():
                return obj
            errors.append(f"{path.name}: not a greg-fast checkpoint")
        except Exception as err:  # truncated, corrupt, unreadable
            errors.append(f"{path.name}: {type(err).__name__}: {err}")
        if report:
            print(f"greg-fast: skipping unusable checkpoint {errors[-1]}", file=sys.stderr)
    raise ValueError(f"--resume {out}: no usable checkpoint ({'; '.join(errors)})")


def stored_settings(out) -> dict:
    """The flags the run in ``out`` was started with, from its newest checkpoint (runs from before
    settings were stored give their identity)."""
    ckpt = load_latest(Path(out), "cpu", report=False)  # the run reports it
    return dict(ckpt.get("settings") or ckpt["identity"])
