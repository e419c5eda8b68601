"""Dense weights saved by other code (greg_fast.load_weights, greg-fast prune --checkpoint): trainer
containers, wrapper prefixes, renamed layers of the same shapes, and mismatches named at once."""
import time

import pytest
import torch
import torch.nn as nn

import greg_fast as gf


def foreign_checkpoint(model, prefix="module.", rename=("fc.", "linear.")):
    """``model``'s weights as pytorch_resnet_cifar10 saved them: DataParallel's prefix, the classifier
    named ``linear``, inside ``{'state_dict': ..., 'best_prec1': ...}``."""
    sd = {prefix + (k.replace(*rename, 1) if k.startswith(rename[0]) else k): v for k, v in model.state_dict().items()}
    return {"state_dict": sd, "best_prec1": 91.7}


def same_outputs(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.module.", ""])
def test_a_checkpoint_from_other_code_loads_with_what_was_changed_said(tmp_path, prefix):
    torch.manual_seed(0)
    source = gf.models.create("resnet20")
    torch.save(foreign_checkpoint(source, prefix), tmp_path / "w.th")
    model = gf.models.create("resnet20")
    notes = gf.load_weights(model, tmp_path / "w.th")
    assert same_outputs(source, model)
    assert ("renamed linear.* -> fc.* (same shapes, in order)" in notes[-1])
    assert len(notes) == 1 + prefix.count(".")  # one per stripped prefix, and the rename


def test_a_bare_state_dict_and_a_greg_fast_file_load_and_missing_counters_are_kept(tmp_path):
    source = gf.models.create("resnet20")
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = gf.models.create("resnet20")
    assert gf.load_weights(model, sd) == [] and same_outputs(source, model)
    gf.save(source, tmp_path / "m.pt")
    assert gf.load_weights(gf.models.create("resnet20"), tmp_path / "m.pt") == []


def test_a_checkpoint_that_does_not_fit_is_named_at_once_and_the_model_is_untouched(tmp_path):
    torch.save(foreign_checkpoint(gf.models.create("resnet56")), tmp_path / "w56.th")
    model = gf.models.create("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        gf.load_weights(model, tmp_path / "w56.th")
    assert time.perf_counter() - start < 5  # refused before any work: reading the file is all it costs
    text = str(err.value)
    assert "does not fit CifarResNet" in text and "stripped the prefix 'module.'" in text
    assert "the checkpoint has 218 keys the model lacks (layer1.3.conv1.weight [16, 16, 3, 3]" in text
    assert text.count("layer1.3.conv1.weight") == 1 and "and 213 more" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ten = gf.models.create("resnet20", num_classes=100)
    torch.save(gf.models.create("resnet20").state_dict(), tmp_path / "w10.pt")
    with pytest.raises(ValueError, match=r"fc.weight: \[10, 64\] in the checkpoint, \[100, 64\] in the model"):
        gf.load_weights(ten, tmp_path / "w10.pt")


@pytest.mark.parametrize("content, message", [
    ([1, 2], "expected a state_dict, found a list"),
    ({"epoch": 3, "optimizer": {}}, "found keys 'epoch', 'optimizer'"),
])
def test_what_is_not_a_state_dict_is_refused_with_what_was_found(tmp_path, content, message):
    torch.save(content, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=message):
        gf.load_weights(nn.Linear(2, 2), tmp_path / "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot be read as a weights-only torch file"):
        gf.load_weights(nn.Linear(2, 2), tmp_path / "junk.pt")
