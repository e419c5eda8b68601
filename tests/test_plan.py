import math

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import greg_fast as gf
from greg_fast import models
from greg_fast.units import MemberKey

from conftest import SmallNet

SMALL = torch.zeros(1, 3, 64, 64)


def names(plan):
    return [l.name for l in plan.layers]


@pytest.mark.parametrize("name,blocks", [("resnet20", 3), ("resnet56", 9)])
def test_uncoupled_cifar_resnet_prunes_inner_block_convs_only(name, blocks):
    p = gf.plan(models.create(name), 0.5, coupled=False)
    assert names(p) == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(blocks)]
    assert "residual add" in p.excluded["conv1"]
    assert "residual add" in p.excluded["layer1.0.conv2"]
    assert "zero channels" in p.excluded["layer2.0.conv2"]  # the option-A shortcut's padding
    assert "model output" in p.excluded["fc"]
    assert all(l.norms == [l.name.replace("conv1", "bn1")] for l in p.layers)
    assert all(l.consumers == [l.name.replace("conv1", "conv2")] for l in p.layers)


def test_torchvision_resnets_follow_the_reference_rule():
    p18 = gf.plan(models.create("resnet18"), 0.5, example_inputs=SMALL, coupled=False)
    assert names(p18) == [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in range(2)]
    p50 = gf.plan(models.create("resnet50"), 0.5, example_inputs=SMALL, coupled=False)
    blocks = {1: 3, 2: 4, 3: 6, 4: 3}
    inner = [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3, 4) for b in range(blocks[s]) for c in (1, 2)]
    # beyond the reference: the stem feeds only convs (the first block's conv1 and its projection
    # shortcut), whose input channels are cut with it; stage_ratios' stem entry of 0 keeps it whole
    assert names(p50) == ["conv1"] + inner
    assert sorted(p50["conv1"].consumers) == ["layer1.0.conv1", "layer1.0.downsample.0"]
    staged = gf.plan(models.create("resnet50"), ratios=gf.stage_ratios(models.create("resnet50"), [0, .6, .6, .6, .21, 0]),
                     example_inputs=SMALL, coupled=False)
    assert [l.name for l in staged.pruned] == inner
    assert "residual add" in p50.excluded["layer1.0.downsample.0"]


def test_vgg_prunes_every_conv_and_cuts_the_classifier_through_flatten():
    p = gf.plan(models.create("vgg19_bn_cifar"), 0.5)
    convs = [n for n, m in models.create("vgg19_bn_cifar").named_modules() if isinstance(m, nn.Conv2d)]
    assert names(p) == convs
    assert p[convs[-1]].consumers == ["classifier"]
    p16 = gf.plan(models.create("vgg16_bn"), 0.5, example_inputs=SMALL)
    assert names(p16)[:13] == [n for n, m in p16._modules.items() if isinstance(m, nn.Conv2d)]
    assert names(p16)[13:] == ["classifier.0", "classifier.3"]
    # flatten-before-linear: one channel of the last conv is 7*7 inputs of classifier.0
    assert p16["features.40"].members[MemberKey("classifier.0", "weight", 1, "input", False)].shape == (512, 49)


def test_unstructured_covers_every_conv_and_linear_but_the_first():
    m = models.create("resnet20")
    p = gf.plan(m, 0.5, granularity="weight")
    all_layers = [n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert names(p) == all_layers[1:] and "first layer" in p.excluded["conv1"]
    assert all(l.n_groups == l.weight.numel() and l.view == (1, l.n_groups, 1) for l in p.layers)


def test_channel_granularity_mirrors_filter_pruning():
    p = gf.plan(models.create("resnet20"), 0.5, granularity="channel")
    assert names(p) == [f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)]
    assert p["layer1.0.conv2"].producer == "layer1.0.conv1"
    assert "model input" in p.excluded["conv1"]
    net = SmallNet()
    pc = gf.plan(net, 0.5, granularity="channel", example_inputs=torch.zeros(1, 3, 6, 6))
    assert names(pc) == ["conv2", "fc1", "fc2"]
    assert pc["fc1"].view == (11, 13, 4)  # 13 channels of conv2, 2x2 pooled features each


@pytest.mark.parametrize("ratio,n,expected", [(0.5, 16, 8), (0.3, 10, 3), (0.55, 100, 55), (0.74, 64, 48),
                                              (0.32, 64, 21), (0.99, 4, 3), (0.9, 1, 0), (0.0, 64, 0),
                                              (0.01, 3, 1)])
def test_n_prune_formula(ratio, n, expected):
    assert gf.n_prune_for(ratio, n) == expected == min(math.ceil(round(ratio * n, 9)), n - 1)


def test_stage_ratios_reproduce_the_reference_resnet56_setting():
    m = models.create("resnet56")
    ratios = gf.stage_ratios(m, [0, 0.75, 0.75, 0.32, 0])
    assert ratios == {"conv1": 0.0, "layer1.*": 0.75, "layer2.*": 0.75, "layer3.*": 0.32, "fc": 0.0}
    p = gf.plan(m, ratios=ratios, coupled=False)
    assert {l.name: l.n_prune for l in p.layers}["layer1.0.conv1"] == 12  # ceil(0.75 * 16)
    assert p["layer3.4.conv1"].n_prune == 21 and p["layer3.4.conv1"].ratio == 0.32
    with pytest.raises(ValueError, match="needs 5 ratios"):
        gf.stage_ratios(m, [0, 0.5, 0.5, 0.5, 0.5, 0])
    with pytest.raises(ValueError, match="ResNet"):
        gf.stage_ratios(models.create("vgg19_bn_cifar"), [0, 1])


def test_ratios_override_globs_and_skip():
    m = models.create("resnet20")
    p = gf.plan(m, 0.5, ratios={"layer3.*": 0.25, "layer3.2.conv1": 0.0}, skip=["layer1.1.*"], coupled=False)
    assert p["layer3.0.conv1"].n_prune == 16 and p["layer3.2.conv1"].n_prune == 0
    assert p["layer1.0.conv1"].n_prune == 8
    assert p.excluded["layer1.1.conv1"] == "skipped by the user"
    assert [l.name for l in p.pruned] == [n for n in names(p) if n != "layer3.2.conv1"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(ratio=1.0), r"ratio must be in \[0, 1\)"),
    (dict(ratio=-0.1), r"ratio must be in \[0, 1\)"),
    (dict(ratios={"layer9.*": 0.5}), "matches no module"),
    (dict(ratios={"layer9.*": 0.5}, coupled=False), "matches no Conv/Linear layer"),
    (dict(granularity="channel", coupled=True), "coupled groups are groups of filters"),
    (dict(ratios={"layer1.*": 1.5}), "ratios\\['layer1.\\*'\\]"),
    (dict(skip=["nonexistent"]), "matches no module"),
    (dict(granularity="kernel"), "granularity must be one of"),
])
def test_bad_plan_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gf.plan(models.create("resnet20"), **kwargs)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_model_error_names_the_module():
    with pytest.raises(gf.UntraceableModelError, match=r"module 'gate' \(Gate\)"):
        gf.plan(DataDependent(), 0.5)


class Branches(nn.Module):
    """A concat, a grouped conv consumer and a conv whose output is returned."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.c(torch.cat([self.a(x), self.b(x)], 1))
        return self.head(torch.relu(self.dw(y)))


def test_uncoupled_concat_grouped_and_output_are_excluded_with_reasons():
    p = gf.plan(Branches(), 0.5, example_inputs=torch.zeros(1, 3, 8, 8), coupled=False)
    assert names(p) == []
    assert "concat" in p.excluded["a"] and "concat" in p.excluded["b"]
    assert "`dw` (Conv2d): conv2d (a depthwise conv" in p.excluded["c"]
    assert "grouped/depthwise conv (groups=16)" in p.excluded["dw"]
    assert "model output" in p.excluded["head"]


def test_cost_counts_removed_params_and_flops_with_torch_flop_counter():
    net = SmallNet()
    x = torch.zeros(1, 3, 6, 6)
    p = gf.plan(net, 0.5, example_inputs=x)
    assert names(p) == ["conv1", "conv2", "fc1"]
    with FlopCounterMode(display=False) as fc:
        net(x)
    c = p.cost()
    assert c["flops_before"] == fc.get_total_flops()
    assert c["params_before"] == sum(t.numel() for t in net.parameters())
    # by hand: conv1 8->4 filters, conv2 13->6 filters with 4 inputs, fc1 11->5 with 6*4 inputs, fc2 5 inputs
    kept = (4 * 3 * 9 + 2 * 4) + (6 * 4 * 9 + 6 + 2 * 6) + (5 * 24 + 5) + (5 * 5 + 5)
    assert c["params_after"] == kept
    flops = 2 * 36 * (4 * 27) + 2 * 36 * (6 * 4 * 9) + 2 * (5 * 24) + 2 * (5 * 5)
    assert c["flops_after"] == flops
    text = repr(p)
    assert "parameters:" in text and f"{kept:,}" in text and "FLOPs:" in text


def test_plan_for_another_model_is_rejected():
    p = gf.plan(models.create("resnet20"), 0.5)
    with pytest.raises(ValueError, match="plan was built for another model"):
        gf.apply_masks(models.create("resnet20"), {}, p)


def test_plan_leaves_the_model_untouched():
    m = models.create("resnet20").train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    gf.plan(m, 0.5)
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
