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
