import copy
import io
import math

import pytest
import torch
import torch.nn as nn

import greg_fast as gf

from conftest import SmallNet, clone, make_batches, train_steps

X = torch.zeros(1, 3, 6, 6)


def setup(method="greg1", granularity="filter", ratio=0.5, opt="sgd", net=None, **hyper):
    """The schedule's rules, checked on the eager reference (test_backends compares the others)."""
    hyper.setdefault("backend", "eager")
    net = net or SmallNet()
    plan = gf.plan(net, ratio, granularity=granularity, example_inputs=X)
    if opt == "sgd":
        inner = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    elif opt == "adam":
        inner = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    else:
        inner = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    return net, plan, gf.GrowingReg(inner, plan, method=method, **hyper)


def reference_scores(layer):
    """Mean |w| per group, written out per granularity (independent of the library's view)."""
    w = layer.weight.detach().abs()
    if layer.granularity == "filter":
        return w.flatten(1).mean(1)
    if layer.granularity == "channel":
        if w.dim() == 4:
            return w.transpose(0, 1).flatten(1).mean(1)
        g = layer.n_groups
        return torch.stack([w[:, c * (w.shape[1] // g):(c + 1) * (w.shape[1] // g)].mean() for c in range(g)])
    return w.flatten()


def lowest(scores, n):
    kept = torch.ones(len(scores), dtype=torch.bool)
    kept[torch.sort(scores, stable=True).indices[:n]] = False
    return kept


@pytest.mark.parametrize("granularity", gf.GRANULARITIES)
def test_greg1_selects_what_one_shot_l1_selects(granularity):
    net, plan, greg = setup("greg1", granularity)
    net2 = clone(net)
    _, plan2, l1 = setup("l1", granularity, net=net2)
    assert l1.done and l1.phase == "done" and greg.phase == "grow"
    for layer in plan.pruned:
        expected = lowest(reference_scores(layer), layer.n_prune)
        assert torch.equal(greg.masks()[layer.name].reshape(-1), expected)
        assert torch.equal(l1.masks()[layer.name].reshape(-1), expected)
        assert int((~expected).sum()) == layer.n_prune
    # one-shot L1 removed those groups at once
    for layer in plan2.pruned:
        w = layer.weight.detach()
        kept = l1.masks()[layer.name]
        removed = w * ~gf.masks.expand_groups(layer, kept)
        assert removed.abs().sum() == 0 and (w * gf.masks.expand_groups(layer, kept)).abs().sum() > 0


def test_lambda_is_k_delta_until_the_ceiling_then_stabilize_then_done():
    net, plan, greg = setup(delta=0.01, interval=3, ceiling=0.05, stabilize=4, mag_ratio_limit=1e12)
    batches = make_batches()
    phases, stop_update = [], 6  # 6 * 0.01 > 0.05
    for i in range(25):
        phases.append(greg.phase)
        train_steps(net, greg, batches, 1, start=i)
        k = min(i // 3 + 1, stop_update)
        for sel, kept in greg.lambdas().values():
            assert sel == k * 0.01 and kept == 0.0
    # the stopping update happens at iteration 15; exactly 4 stabilize steps follow
    assert phases[:16] == ["grow"] * 16
    assert phases[16:20] == ["stabilize"] * 4
    assert phases[20:] == ["done"] * 5 and greg.done
    pen = greg.penalties()
    for layer in plan.pruned:
        mask = greg.masks()[layer.name]
        assert torch.all(pen[layer.name][mask] == 0) and torch.all(pen[layer.name][~mask] == 0.06)


@pytest.mark.parametrize("stabilize", [0, 1, 7])
def test_stabilize_length(stabilize):
    net, _, greg = setup(delta=0.5, interval=2, ceiling=1.0, stabilize=stabilize)
    batches = make_batches()
    seen, i = [], 0
    while not greg.done:
        seen.append(greg.phase)
        train_steps(net, greg, batches, 1, start=i)
        i += 1
    assert seen.count("stabilize") == stabilize
    assert seen.count("grow") == 2 * 2 + 1  # updates at 0, 2, 4 (λ 0.5, 1.0, 1.5 > 1)


@pytest.mark.parametrize("method, hyper", [
    ("l1", {}), ("greg1", dict(delta=0.01, interval=3, ceiling=0.05, stabilize=4)),
    ("greg2", dict(delta=0.25, interval=2, ceiling=1.0, stabilize=3, pick_delta=0.1, pick_ceiling=0.2))])
def test_max_steps_is_the_steps_until_done_when_the_ceiling_stops_growth(method, hyper):
    net, _, greg = setup(method, mag_ratio_limit=1e12, **hyper)
    batches, steps = make_batches(), 0
    while not greg.done:
        train_steps(net, greg, batches, 1, start=steps)
        steps += 1
    assert greg.max_steps() == steps
    net, _, early = setup(method, mag_ratio_limit=1.0, **hyper)  # every ratio passes 1 at once
    steps = 0
    while not early.done:
        train_steps(net, early, batches, 1, start=steps)
        steps += 1
    assert steps <= early.max_steps()  # an upper bound where magnitudes stop growth first


def ratio_of(layer, kept):
    s = reference_scores(layer).double()
    return (s[kept].mean() / s[~kept].mean()).item()


def test_magnitude_ratio_is_smoothed_and_stops_greg1_when_every_layer_reaches_it():
    net, plan, probe = setup()
    masks = probe.masks()
    first = {l.name: ratio_of(l, masks[l.name]) for l in plan.pruned}
    batches = make_batches()
    # just above the smallest ratio: one layer short, so GReg-1 keeps growing
    _, _, greg = setup(net=clone(net), delta=1e-6, interval=1, mag_ratio_limit=min(first.values()) * 1.001)
    train_steps(_root(greg), greg, batches, 1)
    assert greg.phase == "grow"
    assert greg.magnitude_ratios() == pytest.approx(first, rel=1e-12)
    second = {l.name: ratio_of(l, masks[l.name]) for l in greg.layers}
    train_steps(_root(greg), greg, batches, 1, start=1)
    smoothed = {k: 0.9 * first[k] + 0.1 * second[k] for k in first}
    assert greg.magnitude_ratios() == pytest.approx(smoothed, rel=1e-12)
    # just below: every layer has reached it at the first update
    _, _, greg = setup(net=clone(net), delta=1e-6, interval=1, stabilize=2,
                       mag_ratio_limit=min(first.values()) * 0.999)
    train_steps(_root(greg), greg, batches, 1)
    assert greg.phase == "stabilize"
    assert all(sel == 1e-6 for sel, _ in greg.lambdas().values())


def _root(greg):
    return greg.plan.module("")  # the model the plan was built from


def test_unstructured_ignores_the_magnitude_ratio():
    net, _, greg = setup(granularity="weight", delta=0.1, interval=1, ceiling=0.25, mag_ratio_limit=0.0)
    train_steps(net, greg, make_batches(), 2)
    assert greg.phase == "grow"
    train_steps(net, greg, make_batches(), 1, start=2)
    assert greg.phase == "stabilize"


def test_greg2_grows_uniformly_picks_on_current_weights_then_recovers_kept():
    hyper = dict(pick_delta=0.01, pick_ceiling=0.03, delta=0.1, ceiling=0.45, interval=2, recover=-0.005,
                 stabilize=3, mag_ratio_limit=1e9)
    net, plan, greg = setup("greg2", **hyper)
    batches = make_batches()
    assert greg.phase == "pick"
    for i in range(4):  # updates at 0 and 2: λ = 0.01, 0.02 on every group, nothing selected yet
        train_steps(net, greg, batches, 1, start=i)
        n = i // 2 + 1
        for layer in plan.pruned:
            assert torch.all(greg.penalties()[layer.name] == n * 0.01)
            assert greg.masks()[layer.name].all()
    assert greg.phase == "pick"
    expected = {l.name: lowest(reference_scores(l), l.n_prune) for l in plan.pruned}  # weights at the pick
    train_steps(net, greg, batches, 1, start=4)  # update at 4: λ reaches 0.03 -> pick
    assert greg.phase == "grow"
    for layer in plan.pruned:
        assert torch.equal(greg.masks()[layer.name], expected[layer.name])
        assert greg.lambdas()[layer.name] == pytest.approx((0.03, 0.03), rel=1e-12)
    for i in range(5, 7):  # update at 6: selected += delta, kept = recover
        train_steps(net, greg, batches, 1, start=i)
    for sel, kept in greg.lambdas().values():
        assert sel == pytest.approx(0.13, rel=1e-12) and kept == -0.005
    while not greg.done:
        i += 1
        train_steps(net, greg, batches, 1, start=i)
    assert greg.iteration == 18  # updates up to 14 (λ 0.53 > 0.45), 3 stabilize steps
    assert all(sel == pytest.approx(0.53, rel=1e-12) for sel, _ in greg.lambdas().values())


def test_greg2_layers_finish_one_by_one():
    hyper = dict(pick_delta=0.01, pick_ceiling=0.01, delta=0.1, ceiling=10.0, interval=2, stabilize=0,
                 mag_ratio_limit=1e6)
    net, plan, greg = setup("greg2", **hyper)
    batches = make_batches()
    train_steps(net, greg, batches, 6)  # picked at 0, grown at 2 and 4
    first = plan.pruned[0]
    with torch.no_grad():  # make the first layer's removed groups vanish: its ratio becomes inf
        first.weight.mul_(gf.masks.expand_groups(first, greg.masks()[first.name]))
    train_steps(net, greg, batches, 4, start=6)  # updates at 6 and 8
    lam = greg.lambdas()
    assert lam[first.name][0] == pytest.approx(0.01 + 0.3)  # finished at 6, λ frozen
    assert math.isinf(greg.magnitude_ratios()[first.name])
    for layer in plan.pruned[1:]:
        assert lam[layer.name][0] == pytest.approx(0.01 + 0.4)
    assert greg.phase == "grow"


def expected_penalty(layer, lam_groups):
    """λ per weight element built with explicit indexing."""
    w = layer.weight.detach()
    out = torch.zeros_like(w)
    if layer.granularity == "filter":
        for i in range(w.shape[0]):
            out[i] = lam_groups[i]
    elif layer.granularity == "channel":
        step = w.shape[1] // layer.n_groups
        for c in range(layer.n_groups):
            out[:, c * step:(c + 1) * step] = lam_groups[c]
    else:
        out = lam_groups.view(w.shape).to(w.dtype)
    return out


@pytest.mark.parametrize("granularity", gf.GRANULARITIES)
@pytest.mark.parametrize("method", ["greg1", "greg2"])
def test_penalty_adds_lambda_times_w_per_group(granularity, method):
    net, plan, greg = setup(method, granularity, delta=0.3, interval=2, pick_delta=0.2, pick_ceiling=0.2,
                            ceiling=5.0, recover=-0.05)
    train_steps(net, greg, make_batches(), 3)  # updates at 0 and 2 (past GReg-2's pick); 3 is no update
    for layer in plan.layers:
        layer.weight.grad = torch.randn_like(layer.weight)
    before = {l.name: l.weight.grad.clone() for l in plan.layers}
    pen = greg.penalties()
    greg.apply_penalty()
    for layer in plan.pruned:
        lam = expected_penalty(layer, pen[layer.name].float())
        torch.testing.assert_close(layer.weight.grad, before[layer.name] + lam * layer.weight.detach(),
                                   rtol=1e-6, atol=1e-6)
        assert len(set(pen[layer.name].tolist())) == 2


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("granularity", gf.GRANULARITIES)
def test_after_pruning_removed_groups_stay_exactly_zero(opt, granularity):
    net, plan, greg = setup("greg1", granularity, opt=opt, delta=0.5, interval=1, stabilize=1)
    batches = make_batches()
    train_steps(net, greg, batches, 3)
    assert not greg.done
    train_steps(net, greg, batches, 1, start=3)
    assert greg.done
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    train_steps(net, greg, batches, 5, start=4)  # fine-tuning through the wrapper
    for layer in plan.pruned:
        kept = greg.masks()[layer.name]
        keep = gf.masks.expand_groups(layer, kept)
        w = layer.weight.detach()
        assert (w * ~keep).abs().sum() == 0
        assert not torch.equal(w * keep, snapshot[layer.name + ".weight"] * keep)  # kept ones still train
        if granularity == "filter":
            for norm in layer.norms:
                bn = plan.module(norm)
                assert bn.weight[~kept].abs().sum() == 0 and bn.bias[~kept].abs().sum() == 0
            if layer.module.bias is not None:
                assert layer.module.bias[~kept].abs().sum() == 0


def run_schedule(method, total, split=None):
    hyper = dict(delta=0.1, interval=2, ceiling=0.5, stabilize=6, pick_delta=0.05, pick_ceiling=0.1,
                 recover=-0.01, mag_ratio_limit=1e9)
    torch.manual_seed(0)
    net, plan, greg = setup(method, **hyper)
    batches = make_batches()
    if split is None:
        train_steps(net, greg, batches, total)
        return net, greg
    train_steps(net, greg, batches, split)
    buf = io.BytesIO()
    torch.save({"greg": greg.state_dict(), "model": net.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # a fresh process: different init, overwritten by the checkpoint
    net2 = SmallNet()
    net2.load_state_dict(saved["model"])
    _, _, greg2 = setup(method, net=net2, **hyper)
    greg2.load_state_dict(saved["greg"])
    train_steps(net2, greg2, batches, total - split, start=split)
    return net2, greg2


@pytest.mark.parametrize("method,split,phase", [("greg1", 5, "grow"), ("greg1", 13, "stabilize"),
                                                ("greg2", 1, "pick"), ("greg2", 7, "grow"),
                                                ("greg2", 15, "stabilize"), ("greg1", 19, "done")])
def test_resume_is_bit_identical(method, split, phase):
    _, probe = run_schedule(method, split)
    assert probe.phase == phase
    ref_net, ref = run_schedule(method, 22)
    net, greg = run_schedule(method, 22, split)
    assert greg.phase == ref.phase and greg.iteration == ref.iteration == 22
    for (k, a), b in zip(ref_net.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(a, b) for a, b in zip(ref.masks().values(), greg.masks().values()))
    assert ref.lambdas() == greg.lambdas()


def test_state_dict_rejects_a_mismatch():
    _, _, greg = setup("greg1")
    sd = greg.state_dict()
    with pytest.raises(ValueError, match="method 'greg1'"):
        setup("greg2")[2].load_state_dict(sd)
    with pytest.raises(ValueError, match="delta=0.0001"):
        setup("greg1", delta=2e-4)[2].load_state_dict(sd)
    with pytest.raises(ValueError, match="other layers"):
        setup("greg1", granularity="weight")[2].load_state_dict(sd)
    with pytest.raises(ValueError, match="not a GrowingReg state_dict"):
        greg.load_state_dict({"state": {}})


def test_works_with_lr_schedulers_and_grad_scaler():
    net, _, greg = setup(delta=0.2, interval=1)
    sched = torch.optim.lr_scheduler.StepLR(greg, step_size=2, gamma=0.5)
    batches = make_batches()
    for i in range(4):
        train_steps(net, greg, batches, 1, start=i)
        sched.step()
    assert greg.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)

    base, _, plain = setup(delta=0.2, interval=1)
    scaled = clone(base)
    _, _, amp = setup(delta=0.2, interval=1, net=scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for i in range(4):
        x, y = batches[i]
        plain.zero_grad()
        nn.functional.cross_entropy(base(x), y).backward()
        plain.step()
        amp.zero_grad()
        scaler.scale(nn.functional.cross_entropy(scaled(x), y)).backward()
        scaler.step(amp)
        scaler.update()
    assert amp.iteration == 4
    for a, b in zip(base.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("nan_guard", [False, True])
def test_at_most_one_host_sync_per_update_and_none_between(monkeypatch, nan_guard):
    """Without the NaN guard no step syncs but the λ updates (one each); the guard adds one."""
    net, _, greg = setup(delta=0.01, interval=3, nan_guard=nan_guard)
    batches = make_batches()
    syncs, counting = [], [False]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, _name=name, **k):
            if counting[0]:
                syncs.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for i in range(7):
        x, y = batches[i % len(batches)]
        greg.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        syncs.clear()
        counting[0] = True
        greg.step()
        counting[0] = False
        assert len(syncs) <= (1 if i % 3 == 0 else 0) + nan_guard, (i, syncs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="greg3"), "method must be one of"),
    (dict(interval=0), "interval must be an integer >= 1"),
    (dict(delta=-1e-4), "delta must be"),
    (dict(stabilize=-1), "stabilize must be"),
    (dict(ceiling=float("nan")), "ceiling must be"),
    (dict(method="greg2", pick_ceiling=2.0), r"pick_ceiling \(2.0\) must not exceed ceiling"),
    (dict(backend="cuda-magic"), "unknown backend"),
])
def test_bad_hyper_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        setup(**kwargs)


def test_optimizer_must_hold_the_planned_weights():
    net = SmallNet()
    plan = gf.plan(net, 0.5, example_inputs=X)
    opt = torch.optim.SGD(net.fc2.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold the weights of planned layers \['conv1"):
        gf.GrowingReg(opt, plan)


def test_empty_plan_is_done_at_once_and_steps_like_the_inner_optimizer():
    net, plan, greg = setup(ratio=0.0)
    assert plan.pruned == [] and greg.done
    ref = clone(net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batches = make_batches()
    train_steps(net, greg, batches, 3)
    train_steps(ref, ref_opt, batches, 3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))


def test_apply_masks_zeroes_filters_and_their_batchnorm():
    net, plan, greg = setup()
    masks = greg.masks()
    gf.apply_masks(net, masks, plan)
    kept = masks["conv2"]
    assert net.conv2.weight[~kept].abs().sum() == 0 and net.conv2.bias[~kept].abs().sum() == 0
    assert net.bn2.weight[~kept].abs().sum() == 0 and net.bn2.bias[~kept].abs().sum() == 0
    assert net.conv2.weight[kept].abs().sum() > 0
    with pytest.raises(ValueError, match="bool tensor of shape \\[13\\]"):
        gf.apply_masks(net, {"conv2": torch.ones(4, dtype=torch.bool)}, plan)
    with pytest.raises(KeyError, match="not a layer of the plan"):
        gf.apply_masks(net, {"fc2": torch.ones(5, dtype=torch.bool)}, plan)


@pytest.mark.parametrize("granularity", gf.GRANULARITIES)
def test_schedule_memory_is_per_group_or_one_bit_per_weight(granularity):
    net, plan, greg = setup(granularity=granularity, delta=0.1, interval=1)
    train_steps(net, greg, make_batches(), 2)
    groups = sum(l.n_groups for l in plan.pruned)
    layers = len(plan.pruned)
    if granularity == "weight":  # the mask: one bit per weight, plus O(layers)
        assert greg.state_bytes() <= groups // 8 + layers + 8 * 8 * layers
    else:  # a bool, a layer index and a float score per group, plus O(layers)
        assert greg.state_bytes() <= groups * (1 + 8 + 4) + 8 * 8 * layers


def test_optimizer_hooks_schedulers_and_deepcopy_work_on_the_wrapper():
    import warnings
    net = SmallNet()
    x = torch.zeros(1, 3, 6, 6)
    greg = gf.GrowingReg(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), gf.plan(net, 0.5, example_inputs=x),
                         interval=1, delta=0.1)
    seen = []
    greg.register_step_pre_hook(lambda opt, args, kwargs: seen.append(("pre", opt.iteration)))
    greg.register_step_post_hook(lambda opt, args, kwargs: seen.append(("post", opt.iteration)))
    greg.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    greg.register_load_state_dict_post_hook(lambda opt: seen.append("loaded"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" or other warning
        schedulers = [torch.optim.lr_scheduler.StepLR(greg, 2),
                      torch.optim.lr_scheduler.CosineAnnealingLR(greg, 10),
                      torch.optim.lr_scheduler.OneCycleLR(greg, max_lr=0.1, total_steps=20),
                      torch.optim.lr_scheduler.SequentialLR(
                          greg, [torch.optim.lr_scheduler.ConstantLR(greg, 0.5, total_iters=2),
                                 torch.optim.lr_scheduler.ExponentialLR(greg, 0.9)], milestones=[2])]
        for x_, y in make_batches(n=3):
            greg.zero_grad()
            nn.functional.cross_entropy(net(x_), y).backward()
            greg.step()
            for s in schedulers:
                s.step()
    assert seen[:2] == [("pre", 0), ("post", 1)] and len(seen) == 6
    state = greg.state_dict()
    assert state["extra"] == 1
    greg.load_state_dict(state)
    assert seen[-1] == "loaded"
    twin_net, twin = copy.deepcopy((net, greg))
    assert twin.masks().keys() == greg.masks().keys() and twin.backend is greg.backend
    x_, y = make_batches(n=1)[0]
    for model, opt in ((net, greg), (twin_net, twin)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_), y).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin_net.parameters()))


def test_schedule_settings_are_checked_by_name_and_unstructured_masks_are_weight_shaped():
    net = SmallNet()
    plan = gf.plan(net, 0.5, granularity="weight", example_inputs=torch.zeros(1, 3, 6, 6))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"unknown schedule setting\(s\) \['delat'\]"):
        gf.GrowingReg(opt, plan, delat=5)
    greg = gf.GrowingReg(opt, plan, method="l1")
    for layer in plan.layers:
        mask = greg.masks()[layer.name]
        assert mask.shape == layer.weight.shape and int((~mask).sum()) == layer.n_prune
    assert gf.Hyper().delta == 1e-4 and greg.hyper == gf.Hyper.from_settings("l1").as_dict()
