"""Bad input gets an error naming the problem, before anything is written; non-finite gradients are
skipped and counted. (Plan, data, model and checkpoint errors are tested beside their modules.)"""
import json
import re

import pytest
import torch

import greg_fast as gf
from greg_fast import data as datasets
from greg_fast.cli import main

from conftest import SmallNet, make_batches, train_steps
from test_cli import TINY

X = torch.zeros(1, 3, 6, 6)


def test_nan_gradients_are_skipped_and_never_reach_lambda_or_weights():
    net = SmallNet()
    plan = gf.plan(net, 0.5, example_inputs=X)
    greg = gf.GrowingReg(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), plan, delta=0.1, interval=1)
    batches = make_batches()
    train_steps(net, greg, batches, 2)
    weights = {k: v.detach().clone() for k, v in net.named_parameters()}
    lam, it = greg.lambdas(), greg.iteration
    for bad in (float("nan"), float("inf")):
        greg.zero_grad()
        torch.nn.functional.cross_entropy(net(batches[0][0]), batches[0][1]).backward()
        net.fc2.weight.grad[0, 0] = bad
        greg.step()
    assert greg.skipped_steps == 2 and greg.iteration == it and greg.lambdas() == lam
    assert all(torch.equal(weights[k], v) for k, v in net.named_parameters())  # (BN statistics move)
    assert greg.state_dict()["greg"]["skipped_steps"] == 2


def test_weights_on_several_devices_are_refused():
    net = SmallNet()
    plan = gf.plan(net, 0.5, example_inputs=X)
    net.fc1.to("meta")
    with pytest.raises(ValueError, match=r"several devices \['cpu', 'meta'\]"):
        gf.GrowingReg(torch.optim.SGD(net.parameters(), lr=0.1), plan)


@pytest.mark.parametrize("flag,value,message", [
    ("--interval", "0", "interval must be an integer >= 1"),
    ("--delta", "-1e-4", "delta must be a finite number >= 0"),
    ("--stabilize", "-5", "stabilize must be an integer >= 0"),
    ("--ceiling", "-1", "ceiling must be a finite number >= 0"),
    ("--ratio", "1.0", r"ratio must be in \[0, 1\)"),
    ("--ratio", "-0.2", r"ratio must be in \[0, 1\)"),
    ("--recover", "nan", "recover must be a finite number"),
    ("--lr-ft", "-0.01", "not a finite number > 0"),
    ("--lr-ft", "0", "not a finite number > 0"),
    ("--lr-reg", "-0.001", "--lr-reg must be a finite number > 0"),
    ("--lr-pretrain", "0", "--lr-pretrain must be a finite number > 0"),
    ("--finetune-epochs", "-3", "--finetune-epochs must be >= 0"),
    ("--batch-size", "-4", "--batch-size must be >= 1"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--momentum", "1.5", r"--momentum must be in \[0, 1\)"),
    ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0"),
    ("--max-skipped-steps", "0", "--max-skipped-steps must be >= 1"),
])
def test_cli_refuses_bad_settings_before_writing_anything(tmp_path, capsys, flag, value, message):
    args = ["prune", "--method", "greg1", *TINY, "--out", str(tmp_path / "out"), f"{flag}={value}"]
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_pick_ceiling_above_ceiling(tmp_path, capsys):
    args = ["prune", "--method", "greg2", *TINY, "--out", str(tmp_path / "out")]
    args[args.index("--pick-ceiling") + 1] = "2.0"
    assert main(args) == 2
    assert "pick_ceiling (2.0) must not exceed ceiling (1.0)" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--model", "resnet7"), ("--data", "mnist"), ("--method", "greg3")])
def test_unknown_model_dataset_or_method_is_named(tmp_path, capsys, flag, value):
    args = ["prune", "--method", "greg1", *TINY, "--out", str(tmp_path / "out")]
    args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert f"invalid choice: '{value}'" in capsys.readouterr().err


def test_job_counts_steps_with_non_finite_gradients(tmp_path, monkeypatch):
    original = datasets._digits

    def poisoned(*args):
        d = original(*args)
        d.train.tensors[0][5, 0, 4, 4] = float("nan")  # one bad image: its batch's gradient is NaN
        return d
    monkeypatch.setattr(datasets, "_digits", poisoned)
    out = tmp_path / "nan"
    assert main(["prune", "--method", "greg1", *TINY, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # the poisoned batch comes once per epoch: pretrain, regularize (one pass or more), fine-tune
    assert summary["skipped_steps"] >= 3
    model = gf.load(out / "model.pt")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())  # BatchNorm statistics too
    assert summary["pruned"]["test_acc"] > 15  # the model still works: chance is 10, a NaN-poisoned one sits there


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["prune", "--method", "greg1", *TINY, "--out", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_bench_names_an_unknown_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--models", "resnet999"])
    assert exit_info.value.code == 2 and "unknown model(s) resnet999" in capsys.readouterr().err
    from greg_fast import bench, models
    assert all(bench.zoo_name(m) in models.names() for m in bench.MODELS)  # the default list is accepted


def test_imagefolder_with_one_class_is_refused(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "cat" / "a.png")
    with pytest.raises(ValueError, match="1 class folder"):
        datasets.load("imagefolder", tmp_path)


def test_a_diverged_job_stops_instead_of_looping(tmp_path, capsys):
    args = ["prune", "--method", "greg1", *TINY, "--out", str(tmp_path / "out"), "--max-skipped-steps", "3"]
    args[args.index("--lr-reg") + 1] = "1e30"  # every regularization step overflows
    args[args.index("--delta") + 1] = "1e30"
    assert main(args) == 2
    assert "3 steps in a row had non-finite gradients" in capsys.readouterr().err


def test_growing_reg_stops_after_too_many_skipped_steps_in_a_row():
    net = SmallNet()
    greg = gf.GrowingReg(torch.optim.SGD(net.parameters(), lr=0.1), gf.plan(net, 0.5, example_inputs=X),
                         max_skipped_in_a_row=3)
    x, y = make_batches()[0]
    for i in range(3):
        greg.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        net.fc2.weight.grad[0, 0] = float("nan")
        if i < 2:
            greg.step()
    with pytest.raises(RuntimeError, match="3 steps in a row had non-finite gradients"):
        greg.step()


@pytest.mark.parametrize("recover", [float("nan"), float("inf")])
def test_non_finite_recover_is_refused(recover):
    net = SmallNet()
    with pytest.raises(ValueError, match="recover must be a finite number"):
        gf.GrowingReg(torch.optim.SGD(net.parameters(), lr=0.1), gf.plan(net, 0.5, example_inputs=X),
                      method="greg2", recover=recover)


def test_state_saved_for_other_ratios_is_refused():
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    saved = gf.GrowingReg(opt, gf.plan(net, 0.7, example_inputs=X)).state_dict()
    other = gf.GrowingReg(opt, gf.plan(net, 0.3, example_inputs=X))
    with pytest.raises(ValueError, match="other n_prune: layer 'conv1' has n_prune=6 there, 3 in this plan"):
        other.load_state_dict(saved)
    del saved["greg"]["n_prune"]  # a state from before n_prune was saved: the masks tell
    with pytest.raises(ValueError, match="mask of 'conv1' removes 6 groups, this plan prunes 3"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("call,message", [
    (lambda net, plan: gf.plan(net, "0.5", example_inputs=X), "ratio must be a number in"),
    (lambda net, plan: gf.plan(net, ratios=[0.5], example_inputs=X), "ratios must map layer names"),
    (lambda net, plan: gf.plan(net, 0.5, example_inputs="abc"), "example_inputs must be a tensor"),
    (lambda net, plan: gf.plan("net", 0.5), "needs an nn.Module"),
    (lambda net, plan: gf.GrowingReg(net.parameters(), plan), "wraps a torch.optim optimizer"),
    (lambda net, plan: gf.GrowingReg(torch.optim.SGD(net.parameters(), lr=0.1), None), "needs the Plan"),
    (lambda net, plan: gf.apply_masks(net, {"conv1": [True] * 8}, plan), "must be a bool tensor"),
    (lambda net, plan: gf.apply_masks(net, {"conv1": torch.ones(8, dtype=torch.bool, device="meta")}, plan),
     "is on meta"),
])
def test_wrong_arguments_get_errors_that_name_them(call, message):
    net = SmallNet()
    plan = gf.plan(net, 0.5, example_inputs=X)
    with pytest.raises((ValueError, TypeError), match=message):
        call(net, plan)


def test_plan_sees_through_compile_and_data_parallel():
    net = SmallNet()
    expected = [l.name for l in gf.plan(net, 0.5, example_inputs=X).layers]
    for wrapped in (torch.compile(net), torch.nn.DataParallel(net)):
        plan = gf.plan(wrapped, 0.5, example_inputs=X)
        assert [l.name for l in plan.layers] == expected
        gf.apply_masks(wrapped, {"conv1": torch.ones(8, dtype=torch.bool)}, plan)


def test_compaction_leaves_model_and_plan_usable_or_refuses_clearly():
    net = SmallNet()
    plan = gf.plan(net, 0.5, example_inputs=X)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    greg = gf.GrowingReg(opt, plan, method="l1")
    masks = greg.masks()
    gf.compact(net, masks, plan, optimizer=opt)
    assert "compacted since" in repr(plan) and re.search(r"\nconv1 +8 +4 ", repr(plan))  # 8 channels as planned
    for again in (lambda: gf.compact(net, masks, plan), lambda: gf.apply_masks(net, masks, plan), greg.step):
        with pytest.raises(ValueError, match="before compaction"):
            again()


@pytest.mark.parametrize("how", ["ratio 0", "all skipped"])
def test_compacting_with_nothing_to_remove_returns_the_model_unchanged(how):
    net = SmallNet()
    plan = gf.plan(net, 0.0 if how == "ratio 0" else 0.5, skip=() if how == "ratio 0" else ["*"], example_inputs=X)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    masks = {l.name: torch.ones(l.n_groups, dtype=torch.bool) for l in plan.layers}
    assert gf.compact(net, masks, plan, backend="cpp") is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_lbfgs_inner_optimizer_gets_a_penalized_closure():
    torch.manual_seed(0)
    net = SmallNet()
    plan = gf.plan(net, 0.5, example_inputs=X)
    greg = gf.GrowingReg(torch.optim.LBFGS(net.parameters(), lr=0.1, max_iter=3), plan, delta=0.5, interval=1)
    x, y = make_batches()[0]
    calls = []

    def closure():
        greg.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        calls.append(net.conv1.weight.grad.clone())
        return loss
    greg.step(closure)  # LBFGS.step needs its closure: a TypeError before
    greg.step(closure)
    assert len(calls) > 3 and greg.iteration == 2  # LBFGS re-evaluated the closure
    # every evaluation the inner optimizer sees carries this step's penalty λ·w
    lam = greg.penalties()["conv1"].float().view(-1, 1, 1, 1)
    calls.clear()
    greg._reg.penalized(closure)()
    torch.testing.assert_close(net.conv1.weight.grad, calls[-1] + lam * net.conv1.weight.detach())


def test_frozen_layers_are_not_planned_and_warned_about():
    net = SmallNet()
    net.conv1.weight.requires_grad_(False)
    plan = gf.plan(net, 0.5, example_inputs=X)
    assert "frozen" in plan.excluded["conv1"]
    net = SmallNet()
    plan = gf.plan(net, 0.5, example_inputs=X)
    net.conv2.weight.requires_grad_(False)  # frozen after planning
    with pytest.warns(UserWarning, match=r"\['conv2'\] are frozen"):
        gf.GrowingReg(torch.optim.SGD(net.parameters(), lr=0.1), plan)


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import greg_fast.job

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(greg_fast.job, "run", interrupted)
    assert main(["prune", "--method", "greg1", *TINY, "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"--resume {tmp_path / 'o'}" in err and "Traceback" not in err
