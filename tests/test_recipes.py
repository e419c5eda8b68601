"""The paper's recipes: each plan reproduces the published FLOPs reduction (plan cost only, no
data), and the command line fills a run from a recipe with explicit flags taking precedence."""
import json

import pytest
import torch

import greg_fast as gf
from greg_fast import models
from greg_fast.cli import main
from greg_fast.recipes import RECIPES

from test_cli import TINY

CLASSES = {"cifar10": 10, "cifar100": 100, "imagefolder": 1000}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_plans_reproduce_the_published_speedup(name):
    flags = RECIPES[name].defaults()
    model = models.create(flags["model"], CLASSES[flags["data"]])
    size = 224 if flags["data"] == "imagefolder" else 32
    ratios = gf.stage_ratios(model, flags["stage_ratios"]) if "stage_ratios" in flags else None
    plan = gf.plan(model, flags.get("ratio", 0.0), ratios=ratios, skip=flags.get("skip", ()),
                   example_inputs=torch.zeros(1, 3, size, size), coupled=flags["coupled"])
    cost = plan.cost()
    speedup = cost["flops_before"] / cost["flops_after"]
    assert speedup == pytest.approx(RECIPES[name].paper["speedup"], rel=0.02)


def test_a_recipe_fills_the_run_and_explicit_flags_override_it(tmp_path, capsys):
    out = tmp_path / "r"
    # TINY names its own model, data and ratio: they win over the recipe's
    assert main(["prune", "--recipe", "resnet56-cifar10", "--method", "greg1", *TINY, "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "resnet20" and s["ratio"] == 0.5 and s["stage_ratios"] is None
    assert s["recipe"] == {"name": "resnet56-cifar10", "paper": RECIPES["resnet56-cifar10"].paper}
    assert main(["recipes"]) == 0 and "resnet50-imagenet-3.06x" in capsys.readouterr().out


def test_a_run_without_a_recipe_names_what_is_missing(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--method", "greg1", "--pretrain-epochs", "1"])
    err = capsys.readouterr().err
    assert ("missing --model; --data; --finetune-epochs; --lr-ft; --out; --ratio, --stage-ratios or a "
            "--target-flops/--target-params/--target-latency (or a --recipe") in err


def test_a_recipe_without_the_flags_it_does_not_set_lists_all_of_them_at_once(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--recipe", "resnet56-cifar10"])
    err = capsys.readouterr().err
    assert ("--recipe resnet56-cifar10 sets the paper's settings; still give --method; --out; "
            "--pretrain-epochs N (> 0) or --checkpoint FILE") in err


def test_a_recipe_sets_the_published_schedule(tmp_path, monkeypatch):
    import greg_fast.job
    seen = {}
    monkeypatch.setattr(greg_fast.job, "run", lambda args: seen.update(vars(args)))
    assert main(["prune", "--recipe", "resnet50-imagenet-2.31x", "--method", "greg2", "--checkpoint", "dense.pt",
                 "--out", str(tmp_path / "o"), "--interval", "7"]) == 0
    assert seen["model"] == "resnet50" and seen["data"] == "imagefolder"
    assert seen["stage_ratios"] == [0, 0.6, 0.6, 0.6, 0.21, 0] and seen["ratio"] is None
    assert seen["interval"] == 7  # given explicitly: beats the recipe's 5
    assert (seen["stabilize"], seen["weight_decay"], seen["batch_size"], seen["finetune_epochs"]) == (40000, 1e-4, 256, 90)
    assert seen["lr_ft"] == "0:0.01,30:0.001,60:0.0001,75:0.00001"
