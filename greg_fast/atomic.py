"""Crash-safe file writes: a crash, a kill or a full disk leaves the old file or the new one,
never a torn mix (written to a temporary beside it, flushed to disk, then renamed over it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, IO

import torch


def _write(path: Path, fill: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fill(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_atomic(obj, path: Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    _write(path, lambda fh: torch.save(obj, fh))


def write_text_atomic(path: Path, text: str) -> None:
    _write(path, lambda fh: fh.write(text.encode()))
