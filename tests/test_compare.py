"""``greg-fast compare``: methods from one dense model per seed, two protocols, resumable."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from greg_fast import compare
from greg_fast.cli import main

TINY = ["--model", "resnet20", "--data", "digits", "--ratio", "0.5", "--pretrain-epochs", "1", "--lr-pretrain", "0.05",
        "--batch-size", "128", "--lr-reg", "0.01", "--delta", "0.25", "--interval", "2", "--stabilize", "3",
        "--pick-delta", "0.1", "--pick-ceiling", "0.2", "--finetune-epochs", "1", "--lr-ft", "0:0.01", "--quiet"]


def test_methods_and_schedules_are_checked_and_stretched():
    assert compare.parse_methods("l1, greg2,greg1-group") == ["l1", "greg2", "greg1-group"]
    for bad in ("l2", "l1-group", "greg1,greg1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            compare.parse_methods(bad)
    assert compare.stretch_lr_schedule("0:0.01,6:0.001", 10, 15) == "0:0.01,9:0.001"
    assert compare.stretch_lr_schedule("0.01", 4, 9) == "0:0.01"


def test_compare_runs_both_protocols_from_one_dense_model_per_seed_and_reads_finished_jobs_back(tmp_path,
                                                                                                 monkeypatch):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY, "--methods", "l1,greg1", "--seeds", "2", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    runs = result["runs"]
    assert {(r["protocol"], r["method"]) for r in runs} == {(p, m) for p in compare.PROTOCOLS for m in ("l1", "greg1")}
    assert len(runs) == 8 and sorted({r["seed"] for r in runs}) == [0, 1]
    for seed in (0, 1):
        mine = [r for r in runs if r["seed"] == seed]
        assert len({r["dense_test_acc"] for r in mine}) == 1  # every method starts from the same dense model
        assert len({r["flops"] for r in mine}) == 1  # the same pruned architecture
        greg = next(r for r in mine if r["method"] == "greg1")
        total = next(r for r in mine if r["method"] == "l1" and r["protocol"] == compare.PROTOCOLS[1])
        summary = json.loads((out / f"seed{seed}" / "greg1" / "summary.json").read_text())
        extra = -(-greg["regularization_iterations"] // summary["steps_per_epoch"])
        assert extra > 0 and total["extra_finetune_epochs"] == extra
        metrics = (out / f"seed{seed}" / "l1-total-steps" / "metrics.jsonl").read_text().splitlines()
        assert sum('"stage": "finetune"' in line for line in metrics) == 1 + extra
    rows = {(r["protocol"], r["method"]): r for r in result["rows"]}
    assert rows[(compare.PROTOCOLS[0], "greg1")]["seeds"] == 2
    assert rows[(compare.PROTOCOLS[0], "greg1")]["test_acc_std"] >= 0
    for f in ("compare.md", "compare.png", "settings.json"):
        assert (out / f).is_file()
    # a second run of the same command reads every finished job back instead of running it
    import greg_fast.job
    monkeypatch.setattr(greg_fast.job, "run", lambda args: pytest.fail(f"ran {args.out} again"))
    assert main(argv) == 0
    assert json.loads((out / "compare.json").read_text())["runs"] == runs
    # and with fewer seeds: the finished ones, reported over those seeds
    assert main([*argv[:-4], "--seeds", "1", "--out", str(out)]) == 0
    assert json.loads((out / "compare.json").read_text())["runs"] == [r for r in runs if r["seed"] == 0]
    # other settings in the same folder are refused, naming the difference
    assert main([*argv, "--ratio", "0.3"]) == 2


def test_a_killed_compare_continues_where_it_was(tmp_path):
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "greg_fast.cli", "compare", *TINY, "--methods", "greg1,l1", "--seeds", "1",
            "--out", str(out)]
    proc = subprocess.run(args, env={**os.environ, "GREG_FAST_KILL_AT": "regularize:3"}, capture_output=True)
    assert proc.returncode != 0 and not (out / "compare.json").exists()
    dense = out / "seed0" / "dense" / "dense.pt"
    assert dense.is_file() and (out / "seed0" / "greg1" / "checkpoints").is_dir()
    stamp = dense.stat().st_mtime_ns
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert dense.stat().st_mtime_ns == stamp  # not pretrained again
    assert len(json.loads((out / "compare.json").read_text())["runs"]) == 4  # greg1 twice, l1, l1 with more steps


def write_imagefolder(root):
    from PIL import Image
    for split in ("train", "val"):
        for k, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 32), (90 * k + 20 * i, 60, 200 - 90 * k)).save(root / split / name / f"{i}.png")


# imagefolder (224x224) passes too but takes ~6 minutes on 2 cores: behind the slow marker
@pytest.mark.parametrize("name", ["cifar10", pytest.param("imagefolder", marks=pytest.mark.slow)])
def test_compare_runs_on_folder_data(tmp_path, name, monkeypatch):
    from test_data import write_cifar
    import greg_fast.job
    def no_latency(*args, **kwargs):
        raise AssertionError("a compare job measures no latency")
    monkeypatch.setattr(greg_fast.job.report, "compare_latency", no_latency)
    if name == "cifar10":
        write_cifar(tmp_path / "data", "cifar10", n_train=16, n_test=8)
    else:
        write_imagefolder(tmp_path / "data")
    argv = ["compare", *TINY, "--data", name, "--data-dir", str(tmp_path / "data"), "--methods", "l1,greg2",
            "--seeds", "1", "--out", str(tmp_path / "cmp")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["settings"]["data"] == name and len(result["runs"]) == 4


def test_compare_runs_every_method_under_each_allocation_at_the_same_budget(tmp_path, capsys):
    i = TINY.index("--ratio")
    tiny = [*TINY[:i], *TINY[i + 2:], "--target-flops", "2x"]
    out = tmp_path / "alloc"
    assert main(["compare", *tiny, "--methods", "l1,greg1", "--allocations", "uniform,global", "--seeds", "1",
                 "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    labels = {r["method"] for r in result["runs"]}
    assert labels == {"l1@uniform", "greg1@uniform", "l1@global", "greg1@global"}
    for r in result["runs"]:
        assert 0.5 * 0.95 <= 1 / r["flops_reduction"] <= 0.5  # every run at the same budget
    uniform = json.loads((out / "seed0" / "greg1@uniform" / "summary.json").read_text())
    assert uniform["target"]["allocation"] == "uniform"
    assert main(["compare", *TINY, "--allocations", "uniform,global", "--out", str(tmp_path / "x")]) == 2
    assert "needs --target-flops" in capsys.readouterr().err


def test_one_seed_prints_no_spread():
    def record(protocol, method, acc):
        return {"protocol": protocol, "method": method, "test_acc": acc, "test_acc_after_pruning": acc - 5,
                "params": 1e4, "flops": 1e6, "flops_reduction": 2.0, "seconds": {"regularize": 1, "finetune": 2}}
    methods = ["l1", "greg1"]
    one = compare.table(compare.aggregate([record(p, m, 80) for p in compare.PROTOCOLS for m in methods], methods),
                        [90.0], [3.0])
    assert "±" not in one and "80.00" in one and "dense model 90.00%" in one and "one seed, so no spread" in one
    rows = compare.aggregate([record(p, m, a) for p in compare.PROTOCOLS for m in methods for a in (80, 82)], methods)
    two = compare.table(rows, [90.0, 91.0], [3.0, 3.0])
    assert "81.00 ± 1.41" in two and "over 2 seeds" in two and rows[0]["test_acc_std"] > 0
