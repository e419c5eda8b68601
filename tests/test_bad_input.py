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

    def poisoned():
        d = original()
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
    assert summary["pruned"]["test_acc"] > 20  # the model still works
