"""Pruning to a budget: targets met, caps, skips and ratios honoured, rounding exact, GrowingReg
allocating from its own scores, and bad budgets refused before any work."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import greg_fast as gf
from greg_fast import budget as budget_mod
from greg_fast import models
from greg_fast.plan import count_flops
from greg_fast.slices import plan_scores
from greg_fast.units import n_prune_for

SMALL = torch.zeros(1, 3, 64, 64)


def zoo(name):
    torch.manual_seed(0)
    if name == "resnet20":
        return models.create("resnet20", 10), None
    return getattr(torchvision.models, name)(), SMALL


def kept_of(plan, kind):
    c = plan.cost()
    return c[f"{kind}_after"] / c[f"{kind}_before"]


def lowest_masks(plan):
    """The L1 selection of the plan's counts (what GReg-1 and L1 remove)."""
    scores = plan_scores(plan, plan.layers)
    return budget_mod.selection(plan.layers, {l.name: l.n_prune for l in plan.layers}, scores)


def compacted(model, plan):
    """A compacted copy (compact verifies it against the masked model)."""
    model, plan = copy.deepcopy((model, plan))
    return gf.compact(model.eval(), lowest_masks(plan), plan)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "resnet50"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("kind,value", [("flops", "2x"), ("params", 0.4), ("flops", 0.3)])
def test_target_is_met_within_one_percent_and_the_compacted_model_measures_it(name, allocation, kind, value):
    model, x = zoo(name)
    plan = gf.plan(model, target={kind: value}, allocation=allocation, example_inputs=x)
    keep = budget_mod.parse_keep(value, "test")
    got = kept_of(plan, kind)
    assert keep * 0.99 <= got <= keep, (got, keep)
    assert plan.budget.achieved[f"{kind}_kept"] == pytest.approx(got, rel=1e-6)
    small = compacted(model, plan)
    flops = count_flops(small, (SMALL,) if x is not None else (torch.zeros(1, 3, 32, 32),))[1]
    params = sum(p.numel() for p in small.parameters())
    assert params == plan.cost()["params_after"]
    assert flops == pytest.approx(plan.cost()["flops_after"], rel=1e-3)


def test_uniform_allocation_is_one_ratio_up_to_one_step_and_global_differs():
    model, x = zoo("resnet18")
    uniform = gf.plan(model, target={"flops": "2x"}, example_inputs=x)
    ratios = [l.n_prune / l.n_groups for l in uniform.layers]
    assert max(ratios) - min(ratios) <= max(1 / l.n_groups for l in uniform.layers) + 1e-9
    with torch.no_grad():  # one block's filters made weak: a global allocation takes them first
        model.layer3[0].conv1.weight[:128].mul_(1e-3)
    glob = gf.plan(model, target={"flops": "2x"}, allocation="global", example_inputs=x)
    weak = next(l for l in glob.layers if "layer3.0.conv1" in l.name)
    assert weak.n_prune >= 128 and weak.n_prune > uniform[weak.name].n_prune


def test_caps_skips_and_given_ratios_are_honoured():
    model, x = zoo("resnet18")
    plan = gf.plan(model, target={"flops": 0.35}, allocation="global", max_ratio=0.6,
                   skip=["layer4.1.conv1"], ratios={"layer1.0.conv1": 0.0, "layer2.0.conv1": 0.25}, example_inputs=x)
    assert all(l.n_prune <= n_prune_for(0.6, l.n_groups) for l in plan.layers)
    assert "skipped by the user" in plan.excluded["layer4.1.conv1"]
    assert plan["layer1.0.conv1"].n_prune == 0
    assert plan["layer2.0.conv1"].n_prune == n_prune_for(0.25, 128)
    assert 0.35 * 0.99 <= kept_of(plan, "flops") <= 0.35
    # by default no group is cut whole, and none beyond 90%
    full = gf.plan(model, target={"flops": 0.2}, allocation="global", example_inputs=x)
    assert all(l.n_prune <= n_prune_for(0.9, l.n_groups) < l.n_groups for l in full.layers)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("round_to", [8, 32])
def test_round_to_keeps_multiples_and_still_meets_the_target(allocation, round_to):
    model, x = zoo("mobilenet_v2")
    plan = gf.plan(model, target={"flops": "2x"}, allocation=allocation, round_to=round_to, example_inputs=x)
    for l in plan.layers:
        kept = l.n_groups - l.n_prune
        assert kept == l.n_groups or kept % round_to == 0, (l.name, kept)
        if l.n_groups <= round_to:
            assert l.n_prune == 0
    assert kept_of(plan, "flops") <= 0.5
    assert kept_of(plan, "flops") >= 0.5 * (0.99 if round_to == 8 else 0.9)
    compacted(model, plan)
    # with a ratio instead of a target, each count is rounded to the nearest allowed one
    ratio = gf.plan(model, 0.5, round_to=round_to, example_inputs=x)
    for l in ratio.layers:
        kept = l.n_groups - l.n_prune
        assert kept == l.n_groups or kept % round_to == 0
        assert abs(l.n_prune - n_prune_for(0.5, l.n_groups)) <= round_to / 2 or l.n_groups <= round_to


def test_single_layer_channel_and_unstructured_plans_take_targets():
    model, x = zoo("resnet18")
    layers = gf.plan(model, target={"flops": 0.7}, coupled=False, example_inputs=x)
    assert 0.7 * 0.99 <= kept_of(layers, "flops") <= 0.7
    sparse = gf.plan(model, target={"params": 0.2}, granularity="weight", allocation="global", example_inputs=x)
    assert 0.2 * 0.99 <= kept_of(sparse, "params") <= 0.2
    assert all(l.n_prune < l.n_groups for l in sparse.layers)


def test_a_latency_target_is_searched_on_measurements(monkeypatch):
    """The search logic, on a stand-in clock whose speed-up is the FLOPs ratio (a real clock is
    the benchmark's business): the shortest prefix that meets the goal within the noise band."""
    def fake(dense, pruned, inputs, seconds=1.0):
        f0, f1 = count_flops(dense, inputs)[1], count_flops(pruned, inputs)[1]
        return {"dense_ms": f0 * 1e-9, "pruned_ms": f1 * 1e-9, "speedup": f0 / f1,
                "speedup_p10_p90": [0.98 * f0 / f1, f0 / f1], "rounds": 5}
    monkeypatch.setattr(budget_mod, "measure_speedup", fake)
    model, _ = zoo("resnet20")
    plan = gf.plan(model, target={"latency": "1.6x", "batch_size": 2})
    lat = plan.budget.achieved["latency"]
    assert lat["speedup"] >= 1.6 and lat["batch_size"] == 2 and lat["probes"] >= 3
    # the shortest: the plan's FLOPs are those of a 1.6x FLOPs target (same order, same steps)
    flops = gf.plan(model, target={"flops": 1 / 1.6})
    assert kept_of(plan, "flops") >= kept_of(flops, "flops") - 0.02
    assert plan.budget.goal() == ("flops", pytest.approx(kept_of(plan, "flops")))
    # a global latency budget, allocated again from other weights, keeps the measured allocation's FLOPs
    glob = gf.plan(model, target={"latency": "1.6x", "batch_size": 2}, allocation="global")
    measured_flops = glob.budget.flops_keep
    with torch.no_grad():
        model.layer3[0].conv1.weight.mul_(torch.rand_like(model.layer3[0].conv1.weight))
    for _ in range(2):
        gf.GrowingReg(torch.optim.SGD(model.parameters(), lr=0.01), glob, method="greg1")
        assert glob.budget.flops_keep == measured_flops
        assert measured_flops * 0.99 <= kept_of(glob, "flops") <= measured_flops


def test_a_latency_target_measures_on_the_real_clock():
    model, _ = zoo("resnet20")
    plan = gf.plan(model, target={"latency": "1.05x", "batch_size": 4})
    lat = plan.budget.achieved["latency"]
    assert lat["speedup"] >= 1.05 and lat["rounds"] >= 5 and lat["dense_ms"] > 0


def train(model, greg, opt, steps):
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    while not greg.done and greg.iteration < steps:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        greg.step()


SCHEDULE = dict(delta=0.05, interval=1, stabilize=2, pick_delta=0.002, pick_ceiling=0.02)


@pytest.mark.parametrize("method", ["l1", "greg1", "greg2"])
def test_growing_regularization_allocates_globally_from_its_own_scores_and_resumes(method, tmp_path):
    model, _ = zoo("resnet20")
    plan = gf.plan(model, target={"flops": "2x"}, allocation="global")
    planned = {l.name: l.n_prune for l in plan.layers}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    greg = gf.GrowingReg(opt, plan, method=method, **SCHEDULE)
    if method != "greg2":  # selected now, from the same scores the plan ranked: the plan's allocation
        assert {l.name: l.n_prune for l in plan.layers} == planned
    else:  # GReg-2 regularizes every unit the budget may cut, uniformly, until the pick
        assert len(greg.layers) == len(plan.layers)
    half = 5
    train(model, greg, opt, half)
    state = greg.state_dict()
    torch.save(state, tmp_path / "s.pt")
    train(model, greg, opt, 500)
    assert greg.done
    assert 0.5 * 0.99 <= kept_of(plan, "flops") <= 0.5
    masks = greg.masks()
    assert all(int((~masks[l.name]).sum()) == l.n_prune for l in plan.layers)
    if method == "greg2":
        assert {l.name: l.n_prune for l in plan.layers} != planned  # the pick's scores, not the plan's
        idle = [l.name for l in greg.layers if l.n_prune == 0]
        assert all(greg.lambdas()[n] == (0.0, 0.0) for n in idle)
    # a fresh plan (other placeholder counts) takes the checkpoint's allocation back
    fresh_model, _ = zoo("resnet20")
    fresh = gf.plan(fresh_model, target={"flops": "2x"}, allocation="global")
    again = gf.GrowingReg(torch.optim.SGD(fresh_model.parameters(), lr=0.05, momentum=0.9), fresh, method=method,
                          **SCHEDULE)
    again.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert again.iteration == half or method == "l1"
    # and refuses one saved for another target, leaving the plan as it was
    other_model, _ = zoo("resnet20")
    other = gf.plan(other_model, target={"flops": "3x"}, allocation="global")
    refused = gf.GrowingReg(torch.optim.SGD(other_model.parameters(), lr=0.05), other, method=method, **SCHEDULE)
    before, schedule = [l.n_prune for l in other.layers], refused.schedule
    with pytest.raises(ValueError, match="another target|other settings"):
        refused.load_state_dict(state)
    assert [l.n_prune for l in other.layers] == before and refused.schedule is schedule
    # an allocation that fits, in a checkpoint that does not (other settings): nothing changes either
    same_model, _ = zoo("resnet20")
    same = gf.plan(same_model, target={"flops": "2x"}, allocation="global")
    with torch.no_grad():
        same_model.conv1.weight.mul_(torch.rand_like(same_model.conv1.weight))
    other_settings = gf.GrowingReg(torch.optim.SGD(same_model.parameters(), lr=0.05), same, method=method,
                                   **{**SCHEDULE, "stabilize": 3})
    before, schedule = [l.n_prune for l in same.layers], other_settings.schedule
    with pytest.raises(ValueError, match="stabilize"):
        other_settings.load_state_dict(state)
    assert [l.n_prune for l in same.layers] == before and other_settings.schedule is schedule


@pytest.mark.parametrize("call,message", [
    (lambda m: gf.plan(m, 0.5, target={"flops": "2x"}), "a ratio or a target, not both"),
    (lambda m: gf.plan(m, target={"flops": 0}), r"must be in \(0, 1\]"),
    (lambda m: gf.plan(m, target={"flops": 1.5}), r"must be in \(0, 1\]"),
    (lambda m: gf.plan(m, target={"params": "0.5x"}), "speed-up must be a finite number >= 1"),
    (lambda m: gf.plan(m, target={"flops": "fast"}), "fraction kept such as 0.5"),
    (lambda m: gf.plan(m, target={"flops": 0.5, "params": 0.5}), "exactly one of"),
    (lambda m: gf.plan(m, target={"flops": 0.5, "batch_size": 8}), "latency target only"),
    (lambda m: gf.plan(m, target={"flops": 0.01}), r"cannot be reached.*reachable range is \[0\.\d+, 1\]"),
    (lambda m: gf.plan(m, target={"flops": 0.5}, max_ratio=0.2), "reachable range"),
    (lambda m: gf.plan(m, target={"flops": 0.5}, allocation="best"), "allocation must be one of"),
    (lambda m: gf.plan(m, 0.5, allocation="global"), "give target= too"),
    (lambda m: gf.plan(m, target={"flops": 0.5}, max_ratio=1.0), r"max_ratio must be in \(0, 1\): a number"),
    (lambda m: gf.plan(m, target={"flops": 0.5}, round_to=0), "round_to must be an integer >= 1"),
    (lambda m: gf.plan(m, target={"flops": 0.5}, round_to=64), "larger than every group"),
    (lambda m: gf.plan(m, 0.5, round_to=16, ratios={"layer1.0.conv1": 0.5}), "keeps whole"),
    (lambda m: gf.plan(m, target={"flops": 0.5}, granularity="weight", round_to=8), "unstructured"),
    (lambda m: gf.plan(m, target={"latency": "2x"}, granularity="weight"), "needs a structured plan"),
    (lambda m: gf.plan(m.to("meta"), target={"latency": "2x"}), "meta device"),
    (lambda m: gf.plan(nn.Sequential(BatchOne(), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)),
                       target={"latency": "2x", "batch_size": 2}, example_inputs=torch.zeros(1, 3, 16, 16)),
     "at batch 2, and it does not"),
])
def test_bad_budgets_are_refused_before_any_work(call, message):
    model, _ = zoo("resnet20")
    with pytest.raises((ValueError, TypeError), match=message):
        call(model)


class BatchOne(nn.Module):
    """A model that runs only on one sample (it cannot be timed at another batch size)."""
    def forward(self, x):
        assert x.shape[0] == 1, "this model takes one sample"
        return x
