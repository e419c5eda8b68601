import copy

import pytest
import torch
import torch.nn as nn

import greg_fast as gf
from greg_fast import compaction as compact_mod
from greg_fast import models

from conftest import SmallNet, make_batches, train_steps

CIFAR = torch.randn(3, 3, 32, 32)
IMAGENET = torch.randn(2, 3, 64, 64)


def randomize_norms(model):
    """Non-trivial BatchNorm statistics and affine terms, so that a wrong cut shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def random_masks(plan, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {l.name: torch.randperm(l.n_groups, generator=g) >= l.n_prune for l in plan.layers}


def masked_and_compacted(name, ratio, granularity="filter", x=CIFAR, backend="auto"):
    torch.manual_seed(0)
    masked = models.create(name).eval()
    randomize_norms(masked)
    plan = gf.plan(masked, ratio, granularity=granularity, example_inputs=x[:1])
    masks = random_masks(plan)
    gf.apply_masks(masked, masks, plan)
    small = copy.deepcopy(masked)
    small_plan = gf.plan(small, ratio, granularity=granularity, example_inputs=x[:1])
    gf.compact(small, masks, small_plan, backend=backend)
    return masked, small, plan


def assert_same_outputs(a, b, x, rtol=1e-5):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() <= rtol * ya.abs().max()


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("name,x", [("resnet20", CIFAR), ("resnet56", CIFAR), ("vgg19_bn_cifar", CIFAR),
                                    ("resnet18", IMAGENET), ("resnet50", IMAGENET), ("resnet101", IMAGENET),
                                    ("vgg16_bn", IMAGENET)])
def test_compacted_model_computes_what_the_masked_model_computes(name, x, ratio):
    masked, small, plan = masked_and_compacted(name, ratio, x=x)
    assert_same_outputs(masked, small, x)
    params = sum(p.numel() for p in small.parameters())
    assert params == plan.cost()["params_after"] < sum(p.numel() for p in masked.parameters())


@pytest.mark.parametrize("name,x", [("resnet50", IMAGENET), ("vgg19_bn_cifar", CIFAR)])
def test_channel_granularity_removes_input_channels_and_their_producers(name, x):
    masked, small, plan = masked_and_compacted(name, 0.5, "channel", x=x)
    assert_same_outputs(masked, small, x)
    layer = plan.pruned[0]
    assert small.get_submodule(layer.name).in_channels == layer.n_groups - layer.n_prune
    assert small.get_submodule(layer.producer).out_channels == layer.n_groups - layer.n_prune


def test_flatten_before_linear_cuts_blocks_of_features():
    masked, small, plan = masked_and_compacted("vgg16_bn", 0.5, x=IMAGENET)
    assert small.classifier[0].in_features == 256 * 49 and small.classifier[0].out_features == 2048
    assert small.classifier[6].in_features == 2048


def test_cpp_and_torch_gathers_agree():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, 3, 3, generator=g), torch.randn(11, generator=g), torch.randn(4, 9, generator=g),
               torch.randn(6, 6, 2, generator=g).to(torch.bfloat16)]
    rows = [torch.tensor([0, 3, 6]), torch.tensor([10, 1]), torch.empty(0, dtype=torch.int64), torch.tensor([5])]
    cols = [torch.tensor([4, 1]), torch.empty(0, dtype=torch.int64), torch.tensor([8, 0, 2]),
            torch.empty(0, dtype=torch.int64)]
    a = compact_mod.gather(tensors, rows, cols, backend="cpp")
    b = compact_mod.gather(tensors, rows, cols, backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(RuntimeError, match="outside"):
        compact_mod.gather([tensors[0]], [torch.tensor([7])], [cols[0]], backend="cpp")


def test_cpp_and_torch_compaction_give_the_same_model():
    _, small_cpp, _ = masked_and_compacted("resnet20", 0.5, backend="cpp")
    _, small_torch, _ = masked_and_compacted("resnet20", 0.5, backend="torch")
    for (k, a), b in zip(small_cpp.state_dict().items(), small_torch.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_optimizer_state_follows_so_training_continues(opt_name):
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
            "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2)}[opt_name]
    x6 = torch.zeros(1, 3, 6, 6)
    net = SmallNet()
    # a bias right before BatchNorm has a zero gradient up to rounding, which Adam's normalization
    # turns into lr-sized steps of noise: drop it so that the comparison sees the method, not the noise
    net.conv2.bias = None
    plan = gf.plan(net, 0.5, example_inputs=x6)
    opt = make(net.parameters())
    batches = make_batches()
    train_steps(net, opt, batches, 3)  # state exists before pruning
    masks = random_masks(plan)
    gf.apply_masks(net, masks, plan)
    small, small_opt = copy.deepcopy((net, opt))
    gf.compact(small, masks, gf.plan(small, 0.5, example_inputs=x6), optimizer=small_opt)
    assert small.conv2.weight.shape[0] == 13 - plan["conv2"].n_prune
    state = small_opt.state[small.conv2.weight]
    assert all(v.shape == small.conv2.weight.shape for k, v in state.items() if k != "step")
    assert {id(p) for g in small_opt.param_groups for p in g["params"]} == {id(p) for p in small.parameters()}
    for i in range(3, 8):  # k more steps: masked (masks re-applied) and compacted agree
        train_steps(net, opt, batches, 1, start=i)
        gf.apply_masks(net, masks, plan)
        train_steps(small, small_opt, batches, 1, start=i)
    net.eval(), small.eval()
    assert_same_outputs(net, small, torch.randn(4, 3, 6, 6))


def test_compaction_refuses_bad_masks_before_touching_the_model():
    net = SmallNet()
    plan = gf.plan(net, 0.5, example_inputs=torch.zeros(1, 3, 6, 6))
    before = copy.deepcopy(net.state_dict())
    bad = {"conv1": torch.ones(8, dtype=torch.bool), "conv2": torch.zeros(13, dtype=torch.bool)}
    with pytest.raises(ValueError, match="mask of 'conv2' keeps no group"):
        gf.compact(net, bad, plan)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    wplan = gf.plan(net, 0.5, granularity="weight", example_inputs=torch.zeros(1, 3, 6, 6))
    wmask = {"conv2": torch.rand(net.conv2.weight.numel()) > 0.5}
    with pytest.raises(ValueError, match="greg_fast.sparse.pack"):
        gf.compact(net, wmask, wplan)
    with pytest.raises(ValueError, match="another model"):
        gf.compact(SmallNet(), random_masks(plan), plan)


def test_save_load_rebuilds_the_compacted_model_without_pickled_code(tmp_path):
    _, small, _ = masked_and_compacted("resnet56", 0.5)
    gf.save(small, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["arch"] == {"name": "resnet56", "num_classes": 10, "in_channels": 3}
    assert raw["widths"]["layer1.0.conv1"] == [8, 8, 3, 3]  # its filters and the stem's residual group halved
    loaded = gf.load(tmp_path / "m.pt").eval()
    assert_same_outputs(small, loaded, CIFAR, rtol=0)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable greg_fast model file"):
        gf.load(tmp_path / "cut.pt")
    torch.save({"format": gf.io.FORMAT, "widths": {}}, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="damaged greg_fast model file"):
        gf.load(tmp_path / "damaged.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a greg_fast model file"):
        gf.load(tmp_path / "other.pt")



def test_any_model_saves_and_loads_into_a_fresh_instance(tmp_path):
    x6 = torch.randn(2, 3, 6, 6)
    net = SmallNet().eval()
    plan = gf.plan(net, 0.5, example_inputs=x6[:1])
    gf.compact(net, random_masks(plan), plan)
    gf.save(net, tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"pass a fresh instance, load\(path, model=SmallNet\(...\)\)"):
        gf.load(tmp_path / "small.pt")
    loaded = gf.load(tmp_path / "small.pt", model=SmallNet()).eval()
    assert loaded.conv2.out_channels == net.conv2.out_channels < 13
    assert_same_outputs(net, loaded, x6, rtol=0)
    with pytest.raises(ValueError, match="pass an instance of the saved model class"):
        gf.load(tmp_path / "small.pt", model=torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compacted_model_exports():
    _, small, _ = masked_and_compacted("resnet20", 0.5)
    exported = torch.export.export(small, (CIFAR,))
    torch.testing.assert_close(exported.module()(CIFAR), small(CIFAR))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compaction_keeps_each_tensors_layout_dtype_and_requires_grad(backend):
    net = models.create("resnet20").to(torch.float64, memory_format=torch.channels_last)
    net.layer1[0].conv1.weight.requires_grad_(False)  # frozen: its group is not planned, its columns are cut
    plan = gf.plan(net, 0.5, example_inputs=CIFAR[:1].double())
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for p in net.parameters():
        if p.requires_grad:
            opt.state[p]["momentum_buffer"] = torch.randn_like(p)  # channels_last like its weight
    assert "layer1.0.conv1" in plan.excluded
    before = {k: (p.dtype, p.requires_grad, p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
              for k, p in net.named_parameters()}
    assert sum(cl for _, _, cl in before.values()) == 19
    gf.compact(net, random_masks(plan), plan, optimizer=opt, backend=backend, verify=False)
    after = {k: (p.dtype, p.requires_grad, p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
             for k, p in net.named_parameters()}
    assert after == before
    assert all(s["momentum_buffer"].stride() == p.stride() for p, s in opt.state.items())


def test_compaction_given_the_growingreg_wrapper_refuses_with_the_fix():
    net = SmallNet()
    x6 = torch.zeros(1, 3, 6, 6)
    plan = gf.plan(net, 0.5, example_inputs=x6)
    greg = gf.GrowingReg(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), plan)
    train_steps(net, greg, make_batches(), 2)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"Pass its inner optimizer \(optimizer=greg.optimizer"):
        gf.compact(net, random_masks(plan), plan, optimizer=greg)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # untouched
    gf.compact(net, random_masks(plan), plan, optimizer=greg.optimizer)  # the fix works
    train_steps(net, greg.optimizer, make_batches(), 1)
