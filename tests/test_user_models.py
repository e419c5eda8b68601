"""Models as users write them: the plan either excludes a layer with a reason that names the
problem, or the compacted model computes exactly what the masked model computes. Each model here
broke that invariant once (issue 9)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import greg_fast as gf
from greg_fast.units import MemberKey

from test_compact import assert_same_outputs, random_masks


def randomize(model):
    """Random BatchNorm statistics (and affine terms, where there are some): a wrong cut shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        for p in model.parameters():  # layer scales start near 0 (1e-6): a branch would hide a wrong cut
            if p.dim() == 1 and p.numel() and float(p.abs().max()) < 1e-3:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def check_exact(model, x, ratio=0.5, coupled=False):
    """For the layer plan and the coupled plan each: plan, mask at random, compact a copy; the
    outputs agree (eval mode). Returns the plan of ``coupled``."""
    model = randomize(model).eval()
    plans = {}
    for mode in (False, True):
        masked = copy.deepcopy(model)
        plan = plans[mode] = gf.plan(masked, ratio, example_inputs=x, coupled=mode)
        masks = random_masks(plan)
        gf.apply_masks(masked, masks, plan)
        small = copy.deepcopy(masked)
        gf.compact(small, masks, gf.plan(small, ratio, example_inputs=x, coupled=mode))
        assert_same_outputs(masked, small, torch.randn(3, *x.shape[1:]))
    return plans[coupled]


class LeNet(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.c1, self.act, self.pool = nn.Conv2d(1, 6, 5), act, nn.AvgPool2d(2)
        self.c2, self.fc = nn.Conv2d(6, 16, 5), nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(self.act(self.c1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.c2(x)), 1), 1))


@pytest.mark.parametrize("act,zero_to_zero", [
    (nn.Sigmoid(), False), (nn.Hardsigmoid(), False), (nn.Softplus(), False), (nn.Hardtanh(0.1, 1.0), False),
    (nn.ReLU(), True), (nn.GELU(), True), (nn.SiLU(), True), (nn.Tanh(), True), (nn.ELU(), True),
    (nn.Hardtanh(), True)])
def test_activations_that_move_zero_exclude_the_layer(act, zero_to_zero):
    plan = check_exact(LeNet(act), torch.zeros(1, 1, 20, 20))
    if zero_to_zero:
        assert "c1" in [l.name for l in plan.layers]
    else:
        assert "maps 0 to a non-zero value" in plan.excluded["c1"]


class FunctionalActs(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.c1, self.c2 = fn, nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c2(self.fn(self.c1(x)))


@pytest.mark.parametrize("fn,zero_to_zero", [(torch.sigmoid, False), (lambda x: F.hardtanh(x, 0.2, 1.0), False),
                                             (lambda x: x.sigmoid(), False), (F.relu, True),
                                             (lambda x: F.leaky_relu(x, 0.1), True), (lambda x: x.tanh(), True)])
def test_functional_activations_are_judged_at_zero_too(fn, zero_to_zero):
    plan = check_exact(FunctionalActs(fn), torch.zeros(1, 3, 8, 8))
    assert ("c1" in [l.name for l in plan.layers]) == zero_to_zero


class AffineFreeBN(nn.Module):
    def __init__(self, track):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8, affine=False, track_running_stats=track)
        self.c2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_batchnorm_without_affine_keeps_a_removed_channel_at_zero():
    plan = check_exact(AffineFreeBN(track=True), torch.zeros(1, 3, 8, 8))
    assert plan["c1"].norms == ["bn"]


def test_batchnorm_without_any_tensor_compacts_and_the_optimizer_follows():
    net = AffineFreeBN(track=False)
    x = torch.randn(4, 3, 8, 8)
    plan = gf.plan(net, 0.5, example_inputs=x[:1])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(net(x).mean((2, 3)), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    masks = random_masks(plan)
    gf.apply_masks(net, masks, plan)
    small, small_opt = copy.deepcopy((net, opt))
    gf.compact(small, masks, gf.plan(small, 0.5, example_inputs=x[:1]), optimizer=small_opt)
    assert small.bn.num_features == small.c1.out_channels == 8 - plan["c1"].n_prune
    assert small_opt.state[small.c1.weight]["momentum_buffer"].shape == small.c1.weight.shape
    assert_same_outputs(net.eval(), small.eval(), x)


class SharedConsumer(nn.Module):  # one consumer conv called on two producers' outputs
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.a(x))) * self.c(torch.relu(self.b(x)))


class SharedNorm(nn.Module):  # one BatchNorm after two convs
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.ca, self.cb = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.ca(self.bn(self.a(x))) * self.cb(self.bn(self.b(x)))


class FunctionalWeight(nn.Module):  # c1's weight also read by F.conv2d
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))) + self.c2(F.conv2d(x, self.c1.weight, padding=1)).detach() * 0


class FunctionalConsumer(nn.Module):  # the consumer's weight is read functionally as well
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))) + F.conv2d(torch.relu(self.c3(x)), self.c2.weight)


class Recurrent(nn.Module):  # a weight-tied recurrent conv, twice the same module
    def __init__(self):
        super().__init__()
        self.inp, self.rec, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.rec(h))
        h = torch.relu(self.rec(h))
        return self.out(h)


class TiedModules(nn.Module):  # two modules holding the same Parameter
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.c3.weight = self.c2.weight
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))))


class TwiceOnOneOutput(nn.Module):  # a consumer called twice on its producer's output
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.c2(y) * self.c2(y), 1), 1))


@pytest.mark.parametrize("model,excluded,reason", [
    (SharedConsumer, ["a", "b", "c"], "`c` is used more than once: its tensor 'c.weight' is read by 2 ops"),
    (SharedNorm, ["a", "b"], "`bn` is used more than once"),
    (FunctionalWeight, ["c1"], "'c1.weight' is read by 2 ops (`c1` (Conv2d), the model's forward"),
    (FunctionalConsumer, ["c1", "c2"], "'c2.weight' is read by 2 ops (`c2` (Conv2d), the model's forward"),
    (Recurrent, ["inp", "rec"], "`rec` is used more than once"),
    (TiedModules, ["c1", "c3"], "'c3.weight' is read by 2 ops (`c2` (Conv2d), `c3` (Conv2d))"),
    (TwiceOnOneOutput, ["c1", "c2"], "`c2` is used more than once"),
])
@pytest.mark.parametrize("coupled", [False, True])
def test_modules_used_more_than_once_are_not_cut(model, excluded, reason, coupled):
    plan = check_exact(model(), torch.zeros(1, 3, 8, 8), coupled=coupled)
    for name in excluded:
        assert reason in plan.excluded[name], (name, plan.excluded.get(name))
    if model is TiedModules:
        assert "the same parameter as `c3.weight` (tied weights)" in plan.excluded["c2"]


class LinearOnWidth(nn.Module):  # nn.Linear over the last (width) axis of a conv output, W == C
    def __init__(self):
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(x)))


class Tokens(nn.Module):  # tokens [B, T, D] with T == D, flattened into a linear
    def __init__(self, norm=False):
        super().__init__()
        self.embed, self.fc = nn.Linear(4, 6), nn.Linear(36, 3)
        self.norm = nn.BatchNorm1d(6) if norm else nn.Identity()

    def forward(self, x):
        return self.fc(torch.flatten(self.norm(torch.relu(self.embed(x))), 1))


class LiteralView(nn.Module):  # x.view(-1, 6 * 4 * 4): a literal width cannot follow a pruned one
    def __init__(self, flatten):
        super().__init__()
        self.flatten = flatten
        self.c1, self.c2, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(96, 3)

    def forward(self, x):
        return self.fc(self.flatten(torch.relu(self.c2(torch.relu(self.c1(x))))))


class ChannelsLastLinear(nn.Module):  # ConvNeXt-style: permute to channels-last, pointwise linear
    def __init__(self):
        super().__init__()
        self.c1, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Linear(8, 12), nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x)).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(self.fc1(y))).transpose(1, 3)


def test_a_linear_on_the_width_axis_does_not_take_the_channels():
    plan = check_exact(LinearOnWidth(), torch.zeros(1, 3, 8, 8))
    assert "`fc` (Linear): linear does not read the channels as its input channels" in plan.excluded["c1"]


@pytest.mark.parametrize("norm,reason", [(False, "`fc` reads its channels interleaved with another axis"),
                                         (True, "`norm` (BatchNorm1d): batch_norm does not normalize over the channels' axis")])
def test_token_channels_are_tracked_on_their_own_axis(norm, reason):
    plan = check_exact(Tokens(norm), torch.zeros(1, 6, 4))
    assert reason in plan.excluded["embed"]


@pytest.mark.parametrize("flatten", [lambda x: x.view(-1, 6 * 4 * 4), lambda x: x.reshape(x.size(0), 96),
                                     lambda x: torch.reshape(x, (-1, 96))])
def test_a_literal_width_in_view_excludes_only_that_layer(flatten):
    plan = check_exact(LiteralView(flatten), torch.zeros(1, 1, 4, 4))
    assert "reshape" in plan.excluded["c2"] and "to the size 96, which no attribute of" in plan.excluded["c2"]
    assert [l.name for l in plan.layers] == ["c1"]


@pytest.mark.parametrize("flatten", [lambda x: x.view(x.size(0), -1), lambda x: torch.flatten(x, 1),
                                     lambda x: torch.reshape(x, (x.shape[0], -1)), nn.Flatten()])
def test_derived_widths_follow_the_pruned_channels(flatten):
    plan = check_exact(LiteralView(flatten), torch.zeros(1, 1, 4, 4))
    assert plan["c2"].consumers == ["fc"]
    assert plan["c2"].members[MemberKey("fc", "weight", 1, "input", False)].shape == (6, 16)  # 4x4 per channel


class GlobalPool(nn.Module):  # global pooling written as a reduction, SE-style 1x1 consumer
    def __init__(self, reduce):
        super().__init__()
        self.reduce = reduce
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.reduce(torch.relu(self.c1(x))))


@pytest.mark.parametrize("reduce,prunable", [
    (lambda x: x.mean((2, 3), keepdim=True), True), (lambda x: torch.amax(x, dim=[-1, -2], keepdim=True), True),
    (lambda x: x.sum(3).unsqueeze(3), True),
    (lambda x: x.mean(1, keepdim=True).expand(-1, 8, -1, -1), False)])
def test_reductions_over_other_axes_pass_the_channels(reduce, prunable):
    plan = check_exact(GlobalPool(reduce), torch.zeros(1, 3, 8, 8))
    assert ("c1" in [l.name for l in plan.layers]) == prunable
    if not prunable:
        assert "c1" in plan.excluded


def test_a_mean_pooled_classifier_is_cut_through_the_reduction():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.c1(x)).mean((2, 3)))
    plan = check_exact(Net(), torch.zeros(1, 3, 8, 8))
    assert plan["c1"].consumers == ["fc"]


def test_channels_follow_a_permute_to_a_pointwise_linear():
    plan = check_exact(ChannelsLastLinear(), torch.zeros(1, 3, 8, 8))
    assert plan["c1"].consumers == ["fc1"] and plan["fc1"].consumers == ["fc2"]
    assert "model output" in plan.excluded["fc2"]


@pytest.mark.parametrize("name,kwargs,newly_prunable", [
    ("googlenet", dict(aux_logits=False, init_weights=True), ["conv1.conv", "conv2.conv"]),
    ("squeezenet1_0", {}, ["features.3.squeeze", "features.12.squeeze"]),
    ("efficientnet_b0", {}, ["features.1.0.block.1.fc1", "features.2.0.block.2.fc1"]),
    ("mobilenet_v3_large", {}, ["features.4.block.2.fc1"]),
])
def test_layers_whose_consumers_merge_later_are_prunable_and_exact(name, kwargs, newly_prunable):
    """A merge after the consumers (an inception concat, an SE gate) does not couple the producer."""
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(**kwargs)
    plan = check_exact(model, torch.zeros(1, 3, 64, 64))
    assert set(newly_prunable) <= {l.name for l in plan.pruned}


def test_a_detector_takes_nested_inputs_and_points_to_its_backbone():
    """A torchvision detector takes a list of images and computes proposals with data-dependent
    shapes that torch.export cannot capture: the error says so and names the part that plans; the
    backbone (an OrderedDict of feature maps) plans and compacts exactly."""
    import torchvision
    torch.manual_seed(0)
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3).eval()
    with pytest.raises(gf.UntraceableModelError, match=r"module 'rpn' .* shapes \[\[\(3, 96, 96\)\]\].* plan the "
                                                       r"part .*`model.backbone` \(BackboneWithFPN, 66 of its 73"):
        gf.plan(det, 0.5, example_inputs=([torch.rand(3, 96, 96)],))
    with pytest.raises(TypeError, match="got a set among them"):
        gf.plan(det, 0.5, example_inputs=({1, 2},))
    x = torch.rand(2, 3, 96, 96)
    backbone = det.backbone
    randomize(backbone)
    plan = gf.plan(backbone, 0.5, example_inputs=x[:1])
    masks = random_masks(plan)
    changes = gf.output_change(backbone, masks, plan, x, per_output=True)
    assert sorted(changes) == ["['0']", "['1']", "['pool']"] and max(changes.values()) < 1e-5
    before = sum(p.numel() for p in backbone.parameters())
    gf.compact(backbone, masks, plan)  # verified against the masked model on the example inputs
    assert sum(p.numel() for p in backbone.parameters()) < 0.8 * before
    det(torch.rand(1, 3, 96, 96).unbind(0))  # the detector runs with its compacted backbone
