import pickle

import numpy as np
import pytest
import torch

from greg_fast import data


def write_cifar(root, name, n_train=6, n_test=4, seed=0):
    """A tiny folder in the standard python-pickle layout of CIFAR-10 / CIFAR-100."""
    rng = np.random.default_rng(seed)
    folder, train_files, test_files, key, classes = data._CIFAR_FILES[name]
    base = root / folder
    base.mkdir(parents=True)
    written = {}
    for f, n in [(f, n_train) for f in train_files] + [(f, n_test) for f in test_files]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, classes, n).tolist()
        with open(base / f, "wb") as fh:
            pickle.dump({b"data": x, key: y, b"batch_label": b"x"}, fh)
        written[f] = (x, y)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_standard_pickle_folder(tmp_path, name):
    written = write_cifar(tmp_path, name)
    d = data.load(name, tmp_path)
    _, train_files, test_files, _, classes = data._CIFAR_FILES[name]
    assert d.num_classes == classes and d.in_channels == 3
    xtr, ytr = d.train.tensors
    xte, yte = d.test.tensors
    assert xtr.shape == (6 * len(train_files), 3, 32, 32) and xte.shape == (4, 3, 32, 32)
    assert ytr.tolist() == sum((written[f][1] for f in train_files), [])
    assert yte.tolist() == written[test_files[0]][1]
    # normalized per channel with the training statistics; pixel order is CHW as in the format
    raw = torch.tensor(np.concatenate([written[f][0] for f in train_files])).float().view(-1, 3, 32, 32) / 255
    mean, std = raw.mean(dim=(0, 2, 3), keepdim=True), raw.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(xtr, (raw - mean) / std)
    # the folder itself works too
    assert len(data.load(name, tmp_path / data._CIFAR_FILES[name][0]).train) == len(xtr)
    aug = d.augment(xtr[:3], torch.Generator().manual_seed(0))
    assert aug.shape == (3, 3, 32, 32)


def test_missing_cifar_names_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*data_batch_1"):
        data.load("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("cifar10", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs --data-dir"):
        data.load("cifar100", None)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("mnist")


def test_malformed_cifar_file_is_named(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch is not a cifar10 python-pickle batch"):
        data.load("cifar10", tmp_path)


def test_digits_is_built_in_with_a_fixed_split():
    d = data.load("digits")
    assert len(d.train) == 1437 and len(d.test) == 360 and d.num_classes == 10 and d.in_channels == 1
    assert d.train.tensors[0].shape[1:] == (1, 8, 8)
    assert torch.equal(d.test.tensors[1], data.load("digits").test.tensors[1])
    assert torch.bincount(d.test.tensors[1]).min() >= 35  # stratified


def test_imagefolder_needs_train_and_val(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val"):
        data.load("imagefolder", tmp_path)


class _Squares(torch.utils.data.Dataset):  # not a TensorDataset: read through a DataLoader
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), i


def test_the_loader_takes_its_workers_from_the_cpus_this_process_may_use(monkeypatch, recwarn):
    from greg_fast.train import batches, loader_workers
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers() == 1  # one CPU left to the training loop
    got = [y.tolist() for _, y in batches(_Squares(), 4, shuffle=False)]
    assert got == [[0, 1, 2, 3], [4, 5]]
    assert not [w for w in recwarn if "worker" in str(w.message)]  # the DataLoader's "4 workers on 2 CPUs"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader_workers() == 0  # one CPU: load in the training process


def image_tree(root, size=(12, 12), classes=("cat", "dog"), per_class=3, test="test", sizes=None):
    """train/ and ``test``/ with ``per_class`` PNGs of ``size`` (height, width) per class."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", test):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = (sizes or {}).get((split, c, i), size)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("test_split", ["test", "val"])
def test_an_image_folder_is_read_at_the_images_own_size(tmp_path, test_split):
    d = data.load("imagefolder", image_tree(tmp_path, (12, 20), test=test_split))
    assert d.num_classes == 2 and len(d.train) == 6 and len(d.test) == 6
    assert d.train[0][0].shape == d.test[0][0].shape == (3, 12, 20)
    assert data.load("imagefolder", tmp_path, image_size=8).train[0][0].shape == (3, 8, 8)
    assert data.load("imagefolder", tmp_path, image_size=96).test[0][0].shape == (3, 96, 96)


def test_images_of_several_sizes_default_to_imagenets_crops(tmp_path):
    d = data.load("imagefolder", image_tree(tmp_path, sizes={("train", "cat", 0): (30, 40)}))
    assert d.train[0][0].shape == d.test[5][0].shape == (3, 224, 224)


def test_normalization_is_the_datas_imagenets_or_given(tmp_path):
    image_tree(tmp_path, per_class=20)
    raw = data.load("imagefolder", tmp_path, normalize="0,0,0/1,1,1").test
    x = torch.stack([raw[i][0] for i in range(len(raw))])
    assert 0 <= float(x.min()) and float(x.max()) <= 1  # the pixels as they are
    imagenet = data.load("imagefolder", tmp_path).test[0][0]  # the default for image folders
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data.IMAGENET_STATS)
    torch.testing.assert_close(imagenet, (x[0] - mean) / std)
    own = data.load("imagefolder", tmp_path, normalize="data").train
    assert own.transform.transforms[-1].mean != list(data.IMAGENET_STATS[0])
    for bad, message in (("imagenet,x", "must be 'data', 'imagenet' or 'MEAN/STD'"), ("0,0/1,1", "the images have 3"),
                         ("0,0,0/1,0,1", "must be positive")):
        with pytest.raises(ValueError, match=message):
            data.load("imagefolder", tmp_path, normalize=bad)


def test_cifar_reads_an_image_tree_into_memory(tmp_path):
    classes = [f"c{i}" for i in range(10)]
    d = data.load("cifar10", image_tree(tmp_path, (32, 32), classes=classes, per_class=1))
    xtr, ytr = d.train.tensors
    assert xtr.shape == (10, 3, 32, 32) and sorted(ytr.tolist()) == list(range(10))
    torch.testing.assert_close(xtr.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)  # the data's statistics
    assert data.load("cifar10", tmp_path, normalize="imagenet").train.tensors[0].mean() > -3
    with pytest.raises(ValueError, match="10 class folders, cifar100 has 100"):
        data.load("cifar100", tmp_path)


def test_image_trees_that_cannot_be_used_are_refused_before_any_training(tmp_path):
    image_tree(tmp_path / "a")
    (tmp_path / "a" / "train" / "cat" / "1.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"1.png: not a readable image"):
        data.load("imagefolder", tmp_path / "a")
    with pytest.raises(ValueError, match=r"1.png: not a readable image"):
        data.load("cifar10", tmp_path / "a")
    (tmp_path / "b" / "train").mkdir(parents=True)
    (tmp_path / "b" / "test").mkdir()
    with pytest.raises(ValueError, match="Couldn't find any class folder"):
        data.load("imagefolder", tmp_path / "b")
    (tmp_path / "c" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="or .*test'.*one folder per class"):
        data.load("imagefolder", tmp_path / "c")
    image_tree(tmp_path / "d", classes=("cat", "dog"))
    import shutil
    shutil.rmtree(tmp_path / "d" / "test" / "dog")
    with pytest.raises(ValueError, match="different class folders"):
        data.load("imagefolder", tmp_path / "d")
    with pytest.raises(ValueError, match="image size must be a positive integer"):
        data.load("digits", image_size=0)


def test_a_subset_draws_the_same_images_every_time_and_refuses_impossible_sizes(tmp_path):
    d = data.load("digits")
    a, b = data.subset(d, 100, 50), data.subset(d, 100)
    assert len(a.train) == len(b.train) == 100 and len(a.test) == 50 and len(b.test) == len(d.test)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    streamed = data.subset(data.load("imagefolder", image_tree(tmp_path, per_class=4)), 3, 2)
    assert len(streamed.train) == 3 and streamed.test[1][0].shape == (3, 12, 12)
    with pytest.raises(ValueError, match="--train-subset must be between 1 and the 1437 images"):
        data.subset(d, 5000)
