"""Datasets: scikit-learn's digits (built in, the default), CIFAR-10/100 and image folders.

Nothing is downloaded: CIFAR is read from the standard python-pickle folder or from an image tree
(``train/`` and ``test/`` or ``val/`` with one folder per class, as the JPEG copies come), decoded
into memory; any other tree of class folders is ``imagefolder``, streamed at the images' own size
unless an ``image_size`` is given.
"""
from __future__ import annotations

import dataclasses
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


NORMALIZE = ("data", "imagenet")  # or "m1,m2,m3/s1,s2,s3"
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_SAMPLED = 2000  # images whose statistics stand for a streamed data set's


def load(name: str, data_dir: str | Path | None = None, *, image_size: int | None = None,
         normalize: str | None = None) -> Data:
    """The data set ``name``. ``image_size``: resize to it (default: the images' own size; an image
    folder whose images differ in size: 224, ImageNet's crops). ``normalize``: ``"data"`` (the
    training split's per-channel statistics: the default, but for ``imagefolder``), ``"imagenet"``
    (the default for ``imagefolder``; what torchvision's and timm's pretrained weights expect) or
    ``"m1,m2,m3/s1,s2,s3"``."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image size must be a positive integer (pixels), got {image_size!r}")
    if name == "digits":
        return _digits(image_size, normalize)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, _need_dir(name, data_dir), image_size, normalize)
    if name == "imagefolder":
        return _imagefolder(_need_dir(name, data_dir), image_size, normalize)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def subset(data: Data, train: int | None = None, test: int | None = None) -> Data:
    """``data`` with ``train`` / ``test`` images of each split, drawn at random once (the same on every
    run; a split's statistics stay the whole split's)."""
    splits = {}
    for name, n in (("train", train), ("test", test)):
        split = getattr(data, name)
        if n is None:
            splits[name] = split
            continue
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(split):
            raise ValueError(f"--{name}-subset must be between 1 and the {len(split)} images of the {name} split, "
                             f"got {n!r}")
        keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n].sort().values
        in_memory = isinstance(split, torch.utils.data.TensorDataset)
        splits[name] = (torch.utils.data.TensorDataset(*(t[keep] for t in split.tensors)) if in_memory
                        else torch.utils.data.Subset(split, keep.tolist()))
    return dataclasses.replace(data, **splits)


def parse_normalize(normalize: str, channels: int) -> str | tuple[tuple[float, ...], tuple[float, ...]]:
    """``"data"``, or (mean, std) per channel from ``"imagenet"`` or ``"m1,m2,m3/s1,s2,s3"``."""
    if normalize == "data":
        return "data"
    if normalize == "imagenet":
        stats = IMAGENET_STATS
    else:
        try:
            stats = tuple(tuple(float(v) for v in part.split(",")) for part in normalize.split("/"))
        except ValueError:
            stats = ()
        if len(stats) != 2:
            raise ValueError(f"--normalize must be 'data', 'imagenet' or 'MEAN/STD' with one number per "
                             f"channel (e.g. 0.49,0.48,0.45/0.25,0.24,0.26), got {normalize!r}")
        if min(stats[1]) <= 0:
            raise ValueError(f"--normalize {normalize!r}: a standard deviation must be positive")
    if any(len(v) != channels for v in stats):
        raise ValueError(f"--normalize {normalize!r} gives {len(stats[0])} means and {len(stats[1])} deviations; "
                         f"the images have {channels} channel(s)")
    return stats


def _need_dir(name: str, data_dir) -> Path:
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir (downloads are disabled)")
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {str(path)!r} for {name!r} does not exist")
    return path


def _normalize(train: torch.Tensor, test: torch.Tensor, normalize: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    stats = parse_normalize(normalize or "data", train.shape[1])
    if stats == "data":
        mean, std = train.mean(dim=(0, 2, 3), keepdim=True), train.std(dim=(0, 2, 3), keepdim=True)
    else:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in stats)
    return (train - mean) / std, (test - mean) / std


def _resized(x: torch.Tensor, image_size: int | None) -> torch.Tensor:
    if image_size is None or tuple(x.shape[2:]) == (image_size, image_size):
        return x
    return torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                                           align_corners=False)


def _digits(image_size: int | None, normalize: str | None) -> Data:
    """1,797 8x8 grey images of handwritten digits shipped with scikit-learn; a fixed stratified
    80/20 split (the same on every machine)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = _resized(torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0, image_size)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=bunch.target)
    xtr, xte = _normalize(x[tr], x[te], normalize)
    return Data("digits", torch.utils.data.TensorDataset(xtr, y[tr]),
                torch.utils.data.TensorDataset(xte, y[te]), 10, 1, augment=_shift(max(1, x.shape[-1] // 8)))


_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _cifar(name: str, root: Path, image_size: int | None, normalize: str | None) -> Data:
    folder, train_files, test_files, label_key, classes = _CIFAR_FILES[name]
    base = root / folder if (root / folder).is_dir() else root
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing and _splits(root, required=False) is not None:
        (xtr, ytr), (xte, yte), found = _decoded_tree(root)
        if found != classes:
            raise ValueError(f"{name} from the image tree {str(root)!r}: {found} class folders, {name} has {classes}")
    elif missing:
        raise FileNotFoundError(
            f"{name} not found under {str(root)!r}: expected the python version's folder "
            f"'{folder}/' with {', '.join(train_files + test_files)} (missing: {', '.join(missing)}), or an image "
            "tree: train/ and test/ (or val/) with one folder per class")
    else:
        (xtr, ytr), (xte, yte) = (_read_pickles(base, name, files, label_key) for files in (train_files, test_files))
    xtr, xte = _normalize(_resized(xtr, image_size), _resized(xte, image_size), normalize)
    return Data(name, torch.utils.data.TensorDataset(xtr, ytr), torch.utils.data.TensorDataset(xte, yte),
                classes, 3, augment=_crop_flip(max(1, xtr.shape[-1] // 8)))


def _read_pickles(base: Path, name: str, files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
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


def _splits(root: Path, required: bool = True) -> tuple[Path, Path] | None:
    """``root/train`` and ``root/val`` or ``root/test``."""
    test = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test is not None:
        return root / "train", test
    if not required:
        return None
    raise FileNotFoundError(f"an image folder needs {str(root / 'train')!r} and {str(root / 'val')!r} (or "
                            f"{str(root / 'test')!r}), each with one folder per class")


def _folders(root: Path):
    """The ImageFolder pair of ``root``'s splits, checked: the same classes, at least 2."""
    from torchvision.datasets import ImageFolder

    train_dir, test_dir = _splits(root)
    try:
        train, test = ImageFolder(train_dir), ImageFolder(test_dir)
    except (FileNotFoundError, RuntimeError) as err:  # no class folders, or no images in one
        raise ValueError(f"image folder {str(root)!r}: {err}") from err
    if train.classes != test.classes:
        raise ValueError(f"{train_dir.name}/ and {test_dir.name}/ under {str(root)!r} have different class folders: "
                         f"{train.classes[:5]} vs {test.classes[:5]}")
    if len(train.classes) < 2:
        raise ValueError(f"image folder {str(root)!r} has {len(train.classes)} class folder(s): classification "
                         "needs at least 2 (every model would score 100%)")
    return train, test


def _decoded(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an ImageFolder as one uint8-range float tensor (all of one size) and the labels."""
    import torchvision.transforms.functional as TF

    xs, sizes = [], set()
    for path, _ in dataset.samples:
        try:
            image = TF.pil_to_tensor(dataset.loader(path))
        except Exception as err:
            raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
        xs.append(image)
        sizes.add(tuple(image.shape))
        if len(sizes) > 1:
            raise ValueError(f"{path} is {tuple(image.shape)} (channels, height, width), the images before it "
                             f"{tuple(xs[0].shape)}: a tree decoded into memory needs one size")
    return torch.stack(xs).float() / 255, torch.tensor(dataset.targets, dtype=torch.int64)


def _decoded_tree(root: Path):
    train, test = _folders(root)
    return _decoded(train), _decoded(test), len(train.classes)


def _own_size(*datasets) -> tuple[int, int] | None:
    """The images' (height, width) where all of them have one (read from every file's header, which
    also names a file that is not an image before any training)."""
    from PIL import Image

    sizes = set()
    for path in (p for d in datasets for p, _ in d.samples):
        try:
            with Image.open(path) as image:
                sizes.add(image.size[::-1])
        except Exception as err:
            raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    return sizes.pop() if len(sizes) == 1 else None


def _imagefolder(root: Path, image_size: int | None, normalize: str | None) -> Data:
    """A tree of class folders, streamed: at ``image_size`` or the images' own (random crop with padding
    and a flip for training), or where they differ at 224 (random resized crop / resize and center crop)."""
    import torchvision.transforms as T

    train, test = _folders(root)
    own = _own_size(train, test)  # read even with image_size: it checks every file
    own = own if image_size is None else None
    if own is not None or image_size is not None and image_size <= 64:  # small images: pad and crop
        size = own or (image_size, image_size)
        resize = [T.Resize(min(size)), T.CenterCrop(size)]  # (at their own size: for an image of another)
        train_t = resize + [T.RandomCrop(size, padding=max(1, min(size) // 8)), T.RandomHorizontalFlip()]
        test_t = list(resize)
    else:
        size = image_size or 224
        train_t = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        test_t = [T.Resize(round(size / 0.875)), T.CenterCrop(size)]
    stats = parse_normalize(normalize or "imagenet", 3)
    if stats == "data":
        sample = torch.utils.data.Subset(train, torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
                                         [:_SAMPLED].tolist())
        train.transform = T.Compose(test_t + [T.ToTensor()])
        x = torch.stack([image for image, _ in sample])
        stats = (x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist())
    norm = T.Normalize(*stats)
    train.transform = T.Compose(train_t + [T.ToTensor(), norm])
    test.transform = T.Compose(test_t + [T.ToTensor(), norm])
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
