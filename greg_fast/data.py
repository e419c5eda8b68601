"""Datasets: scikit-learn's digits (built in, the default), CIFAR-10/100 and ImageNet-style folders.

Nothing is downloaded: CIFAR is read from the standard python-pickle folder, ImageNet-style data
from ``train/`` and ``val/`` class folders.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


@dataclass
class Data:
    """Train and test splits. In-memory sets hold normalized ``[N, C, H, W]`` float tensors;
    ``augment`` (if any) acts on a training batch, on the batch's device."""
    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    in_channels: int
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


def load(name: str, data_dir: str | Path | None = None) -> Data:
    if name == "digits":
        return _digits()
    if name in ("cifar10", "cifar100"):
        return _cifar(name, _need_dir(name, data_dir))
    if name == "imagefolder":
        return _imagefolder(_need_dir(name, data_dir))
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _need_dir(name: str, data_dir) -> Path:
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir (downloads are disabled)")
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {str(path)!r} for {name!r} does not exist")
    return path


def _normalize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True)
    return (train - mean) / std, (test - mean) / std


def _digits() -> Data:
    """1,797 8x8 grey images of handwritten digits shipped with scikit-learn; a fixed stratified
    80/20 split (the same on every machine)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=bunch.target)
    xtr, xte = _normalize(x[tr], x[te])
    return Data("digits", torch.utils.data.TensorDataset(xtr, y[tr]),
                torch.utils.data.TensorDataset(xte, y[te]), 10, 1, augment=_shift(1))


_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _cifar(name: str, root: Path) -> Data:
    folder, train_files, test_files, label_key, classes = _CIFAR_FILES[name]
    base = root / folder if (root / folder).is_dir() else root
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found under {str(root)!r}: expected the python version's folder "
            f"'{folder}/' with {', '.join(train_files + test_files)} (missing: {', '.join(missing)})")

    def read(files):
        xs, ys = [], []
        for f in files:
            with open(base / f, "rb") as fh:
                try:
                    entry = pickle.load(fh, encoding="bytes")
                    xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    ys.append(np.asarray(entry[label_key], dtype=np.int64))
                except Exception as err:
                    raise ValueError(f"{base / f} is not a {name} python-pickle batch: {err}") from err
        return torch.from_numpy(np.concatenate(xs)).float() / 255, torch.from_numpy(np.concatenate(ys))

    (xtr, ytr), (xte, yte) = read(train_files), read(test_files)
    xtr, xte = _normalize(xtr, xte)
    return Data(name, torch.utils.data.TensorDataset(xtr, ytr), torch.utils.data.TensorDataset(xte, yte),
                classes, 3, augment=_crop_flip(4))


def _imagefolder(root: Path) -> Data:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"imagefolder expects {str(root / split)!r} with one folder per class")
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train = ImageFolder(root / "train", T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
                                                    T.ToTensor(), norm]))
    test = ImageFolder(root / "val", T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm]))
    if train.classes != test.classes:
        raise ValueError(f"train and val folders under {str(root)!r} have different classes")
    if len(train.classes) < 2:
        raise ValueError(f"imagefolder {str(root)!r} has {len(train.classes)} class folder(s): classification "
                         "needs at least 2 (every model would score 100%)")
    return Data("imagefolder", train, test, len(train.classes), 3)


def _shift(pixels: int):
    """Random translation by up to ``pixels`` (zero fill), one offset per image."""
    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pixels,) * 4)
        dy, dx = (torch.randint(0, 2 * pixels + 1, (2, n), generator=gen)).tolist()
        return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return augment


def _crop_flip(pad: int):
    """The standard CIFAR augmentation: random crop with ``pad`` zero padding and horizontal flip."""
    shift = _shift(pad)

    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = shift(x, gen)
        flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return augment
