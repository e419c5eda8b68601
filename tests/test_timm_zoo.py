"""timm's convnets (built without weights) as a new user prunes them: the plan accounts for every
conv/linear weight, the compacted model computes what the masked one does (float64 copies: a
random-init net amplifies float32 rounding), growing regularization runs, and save/load round-trip."""
import copy

import pytest
import torch
import torch.nn as nn

import greg_fast as gf
from greg_fast import budget
from greg_fast.capture import LAYER_TYPES
from greg_fast.slices import plan_scores

from test_groups import random_group_masks
from test_user_models import randomize

timm = pytest.importorskip("timm", reason="timm is a test dependency: pip install -e '.[test]'")

MODELS = ["efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100", "regnety_002", "densenet121",
          "inception_v3", "darknet53", "cspresnet50", "repvgg_a0", "resnetv2_50", "resnetv2_50x1_bit",
          "nf_resnet26", "vgg11_bn", "convnextv2_atto", "dpn68", "skresnet18", "mixnet_s", "ghostnet_100",
          "res2net50_14w_8s", "resnest14d", "xception41", "hrnet_w18_small", "resnet50d", "dla34",
          # attention and norms over channels: heads, stored widths, stream parameters, exact norms
          "vit_tiny_patch16_224", "convnext_atto", "levit_128s", "poolformer_s12", "mambaout_femto",
          "swin_tiny_patch4_window7_224", "mobilevit_xxs", "efficientformer_l1", "edgenext_xx_small",
          "deit_tiny_distilled_patch16_224", "pvt_v2_b0", "coatnet_nano_rw_224", "maxvit_nano_rw_256",
          "efficientvit_b0", "fastvit_t8", "caformer_s18", "repvit_m1"]
# constructor arguments for 128x128 inputs (position embeddings, attention biases and windows are
# built for a resolution); efficientformer_l1 fixes its last stage's resolution: it runs at 224
KWARGS = {"vit_tiny_patch16_224": dict(img_size=128), "levit_128s": dict(img_size=128),
          "swin_tiny_patch4_window7_224": dict(img_size=128, window_size=4),
          "deit_tiny_distilled_patch16_224": dict(img_size=128), "coatnet_nano_rw_224": dict(img_size=128),
          "maxvit_nano_rw_256": dict(img_size=128)}
SIZE = {"efficientformer_l1": 224}
# issue 37's models: what a 0.5 plan must at least remove (the plan's count, which leaves out attention's
# products; bench/zoo.py --attention measures the compacted models at 224 against Torch-Pruning)
FLOPS_FLOOR = dict.fromkeys(["vit_tiny_patch16_224", "convnext_atto", "levit_128s", "poolformer_s12", "mambaout_femto",
                             "swin_tiny_patch4_window7_224", "mobilevit_xxs", "efficientformer_l1", "convnextv2_atto",
                             "res2net50_14w_8s", "mixnet_s", "dpn68", "cspresnet50", "skresnet18"], 60.0)
# where growing regularization has something to cut at the default (exact) plan: all but the models
# whose channels all pass a weight-standardized conv (approximate)
NOTHING_EXACT = {"resnetv2_50x1_bit", "nf_resnet26"}


def float64_outputs(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(x.double())


# more models of families the default run covers (efficientnet_b0, resnetv2_50, torchvision's ResNets,
# nf_resnet26 for weight standardization, the CIFAR VGG and torchvision's densenet121 in test_groups):
# under the zoo marker, which .ci/run runs after the default run
BREADTH = {"tf_efficientnet_b0", "resnetv2_50x1_bit", "resnet50d", "vgg11_bn", "densenet121",
           "swin_tiny_patch4_window7_224", "mobilevit_xxs", "efficientformer_l1", "edgenext_xx_small",
           "deit_tiny_distilled_patch16_224", "pvt_v2_b0", "coatnet_nano_rw_224", "maxvit_nano_rw_256",
           "efficientvit_b0", "fastvit_t8", "caformer_s18", "repvit_m1"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.zoo) if n in BREADTH else n for n in MODELS])
def test_timm_model_plans_compacts_exactly_regularizes_and_round_trips(name, tmp_path):
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, **KWARGS.get(name, {}))).eval()
    size = SIZE.get(name, 128)
    x = torch.randn(1, 3, size, size)
    plan = gf.plan(model, 0.5, example_inputs=x)

    planned = {k.module for layer in plan.layers for k in layer.members}
    convs = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    assert [n for n in convs if n not in planned and n not in plan.excluded] == []
    assert (len(plan.pruned) == 0) == (name in NOTHING_EXACT)
    c = plan.cost()
    assert 100 * (1 - c["flops_after"] / c["flops_before"]) >= FLOPS_FLOOR.get(name, 0.0)

    for ratio in (0.3, 0.7):  # random masks: the mask, not the weights, decides what goes
        masks = random_group_masks(plan, ratio)
        masked, masked_plan = copy.deepcopy((model, plan))
        gf.apply_masks(masked, masks, masked_plan)
        small, small_plan = copy.deepcopy((masked, masked_plan))
        gf.compact(small, masks, small_plan, verify=False)
        a, b = float64_outputs(masked, x), float64_outputs(small, x)
        assert float((a - b).abs().max() / a.abs().max()) < 1e-9, ratio

    if plan.pruned:  # a global budget's uneven counts: still exact (compact verifies on the example input)
        keep = 1 - 0.5 * (1 - c["flops_after"] / c["flops_before"])
        glob = gf.plan(model, target={"flops": keep}, allocation="global", example_inputs=x)
        assert glob.cost()["flops_after"] <= keep * c["flops_before"]
        masks = budget.selection(glob.layers, {l.name: l.n_prune for l in glob.layers},
                                    plan_scores(glob, glob.layers))
        small, small_plan = copy.deepcopy((model, glob))
        gf.compact(small, masks, small_plan)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    greg = gf.GrowingReg(opt, plan, method="greg1", delta=0.5, interval=1, ceiling=1.0, stabilize=1)
    batch = torch.randn(2, 3, size, size)
    for _ in range(2):
        opt.zero_grad()
        model(batch).square().mean().backward()
        greg.step()
    model.eval()
    masks = greg.masks()
    gf.compact(model, masks, plan, opt)  # verify=True: compact checks itself on the example input
    assert sum(p.numel() for p in model.parameters()) == plan.cost()["params_after"]

    gf.save(model, tmp_path / "m.pt")
    fresh = timm.create_model(name, pretrained=False, **KWARGS.get(name, {}))
    loaded = gf.load(tmp_path / "m.pt", model=fresh).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class WrittenWidth(nn.Module):
    """A block that splits its channels at a size computed from the shape, one it stores (as timm's
    Res2Net and MixNet do) or one written in the code: export writes each as a number, and the line
    of code and a trial compaction tell them apart."""

    def __init__(self, size: str):
        super().__init__()
        self.size = size
        self.c1, self.half = nn.Conv2d(3, 8, 3, padding=1), 4
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        if self.size == "computed":
            p, q = torch.split(y, y.shape[1] // 2, 1)
        elif self.size == "stored":
            p, q = torch.split(y, self.half, 1)
        else:
            p, q = torch.split(y, 4, 1)
        return self.head(torch.cat([self.a(p), self.b(q)], 1)).mean((2, 3))


@pytest.mark.parametrize("size", ["computed", "stored", "literal"])
def test_a_width_export_wrote_as_a_number_is_kept_only_when_it_follows(size, tmp_path):
    model = randomize(WrittenWidth(size)).eval()
    x = torch.randn(1, 3, 12, 12)
    plan = gf.plan(model, 0.5, example_inputs=x)
    if size != "literal":
        assert "c1" in {l.name for l in plan.pruned}
    else:
        assert "split" in plan.excluded["c1"] and "does not run" in plan.excluded["c1"]
    masks = random_group_masks(plan, 0.5)
    masked, masked_plan = copy.deepcopy((model, plan))
    gf.apply_masks(masked, masks, masked_plan)
    gf.compact(model, masks, plan)
    assert torch.allclose(masked(x), model(x), atol=1e-6)
    if size == "stored":  # the stored width follows the cut, and a saved model keeps it
        assert model.half == model.a.in_channels == model.c1.out_channels // 2
        gf.save(model, tmp_path / "m.pt")
        loaded = gf.load(tmp_path / "m.pt", model=WrittenWidth(size)).eval()
        assert loaded.half == model.half and torch.equal(loaded(x), model(x))


def test_compact_refuses_a_cut_that_changes_the_output_and_leaves_the_model_untouched():
    model = randomize(WrittenWidth("computed")).eval()
    x = torch.randn(1, 3, 12, 12)
    plan = gf.plan(model, 0.5, example_inputs=x)
    before = copy.deepcopy(model.state_dict())
    model.size = "literal"  # after planning, the split size becomes a written 4: the cut no longer follows
    masks = random_group_masks(plan, 0.5)
    with pytest.raises(ValueError, match="compact\\(\\) refused: .*does not run|compact\\(\\) refused: .*differs"):
        gf.compact(model, masks, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
