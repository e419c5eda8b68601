import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import greg_fast as gf
import greg_fast.data
import greg_fast.sparse
from greg_fast import models
from greg_fast.cli import main

TINY = ["--model", "resnet20", "--data", "digits", "--granularity", "filter", "--ratio", "0.5",
        "--pretrain-epochs", "1", "--lr-pretrain", "0.05", "--batch-size", "128", "--lr-reg", "0.01",
        "--delta", "0.25", "--interval", "2", "--stabilize", "3", "--pick-delta", "0.1", "--pick-ceiling", "0.2",
        "--finetune-epochs", "1", "--lr-ft", "0:0.01", "--quiet"]


def run(tmp_path, method, *extra):
    out = tmp_path / method
    assert main(["prune", "--method", method, *TINY, "--out", str(out), *extra]) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", ["greg1", "greg2", "l1"])
def test_prune_end_to_end_on_digits(tmp_path, method, capsys):
    out, s = run(tmp_path, method)
    for f in ("metrics.jsonl", "summary.json", "model.pt", "accuracy.png", "regularization.pt"):
        assert (out / f).is_file(), f
    assert len(list((out / "checkpoints").glob("ckpt-*.pt"))) == 2  # the last two are kept
    if method != "l1":
        assert (out / "lambda_schedule.png").is_file() and (out / "score_distribution.png").is_file()
        assert s["regularization_iterations"] > 0
    else:
        assert s["regularization_iterations"] == 0
    assert s["pruned"]["params"] < s["dense"]["params"] and s["pruned"]["flops"] < s["dense"]["flops"]
    assert 0 <= s["pruned"]["test_acc"] <= 100 and s["layers_pruned"] == 10  # 9 inner convs and the stem's residual group
    assert s["coupled"] is True and s["penalize"] == "filters"
    assert set(s["wall_time_s"]) >= {"pretrain", "regularize", "finetune", "total"}
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages[0] == "pretrain" and stages[-1] == "finetune"
    saved = torch.load(out / "model.pt", weights_only=True)  # plain tensors and an architecture description
    assert saved["format"] == gf.io.FORMAT
    model = gf.load(out / "model.pt").eval()  # the compacted model, rebuilt without pickled code
    assert sum(p.numel() for p in model.parameters()) == s["pruned"]["params"]
    assert s["pruned"]["compacted"] and model.layer3[0].conv1.out_channels == 32
    x, y = gf.data.load("digits").test.tensors
    with torch.no_grad():
        acc = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    assert abs(acc - s["pruned"]["test_acc"]) < 1e-4
    for key in ("latency_ms_batch1", "latency_ms_batch64"):
        assert s["dense"][key] > 0 and s["pruned"][key] > 0
    assert s["speedup_largest_batch"] == "batch64" and s["speedup"]["batch64"]["rounds"] >= 5
    wall = s["wall_time_s"]  # the latency measurement counts in the wall time
    assert wall["latency"] > 0 and abs(wall["total"] - sum(v for k, v in wall.items() if k != "total")) < 0.05
    assert "test accuracy (%)" in capsys.readouterr().out
    trace = torch.load(out / "regularization.pt", weights_only=True)
    if method != "l1":
        assert trace["lambda_selected"].shape[1] == 10 and trace["scores"].shape[0] == len(trace["iteration"])


def same_result(a, b):
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["regularization_iterations"] == sb["regularization_iterations"]
    assert sa["skipped_steps"] == sb["skipped_steps"]
    for part in ("dense", "pruned"):  # everything but the measured latencies
        for key in ("test_acc", "params", "flops"):
            assert sa[part][key] == sb[part][key], (part, key)
    wa = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


KILLABLE = ["prune", "--method", "greg1", *TINY, "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run every killed one must end as: run once for all of them."""
    reference = tmp_path_factory.mktemp("reference")
    assert main([*KILLABLE, "--out", str(reference)]) == 0
    return reference


@pytest.mark.parametrize("kill_at", ["pretrain:5", "regularize:4", "regularize:10", "finetune:6"])
def test_killed_run_resumes_to_the_same_result(tmp_path, kill_at, uninterrupted):
    """SIGKILL during pretrain, grow, stabilize and fine-tune; --resume ends where the
    uninterrupted run ends (deterministic CPU settings: same data order, same RNG state)."""
    args, reference = KILLABLE, uninterrupted
    killed = tmp_path / "killed"
    env = {**os.environ, "GREG_FAST_KILL_AT": kill_at, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-m", "greg_fast.cli", *args, "--out", str(killed)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "summary.json").exists()
    stage = kill_at.split(":")[0]
    last = torch.load(sorted((killed / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
    assert last["state"]["stage"] == stage  # it died inside that stage
    assert main([*args, "--out", str(killed), "--resume", str(killed)]) == 0
    same_result(reference, killed)


def test_resume_skips_a_corrupt_latest_checkpoint(tmp_path, capsys):
    args = ["prune", "--method", "greg1", *TINY, "--checkpoint-every", "3"]
    out = tmp_path / "run"
    env = {**os.environ, "GREG_FAST_KILL_AT": "regularize:7"}
    proc = subprocess.run([sys.executable, "-m", "greg_fast.cli", *args, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    newest = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn write
    assert main(["prune", "--resume", str(out), "--quiet"]) == 0  # the folder alone: its settings are stored
    assert capsys.readouterr().err.count("skipping unusable checkpoint") == 1
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    same_result(reference, out)


def test_cli_errors_are_clear(tmp_path, capsys):
    out, _ = run(tmp_path, "l1")
    assert main(["prune", "--method", "l1", *TINY, "--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    args = ["prune", "--method", "l1", *TINY, "--out", str(out), "--resume", str(out)]
    assert main([a if a != "0.25" else "0.5" for a in args]) == 2
    assert "other settings: delta=0.25 (now 0.5)" in capsys.readouterr().err
    assert main(["prune", "--resume", str(out), "--ratio", "0.3"]) == 2  # given with it: must match
    assert "other settings: ratio=0.5 (now 0.3)" in capsys.readouterr().err
    assert main(["prune", "--resume", str(out), "--checkpoint-every", "7"]) == 0  # may change
    with pytest.raises(SystemExit):
        main(["prune", "--resume", str(tmp_path / "nothing")])
    assert "no checkpoints/ckpt-*.pt there" in capsys.readouterr().err
    assert main(["prune", "--method", "greg1", *TINY, "--data", "cifar10", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "c")]) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
    bad = torch.nn.Linear(2, 2).state_dict()
    torch.save(bad, tmp_path / "bad.pt")
    cmd = ["prune", "--method", "l1", *TINY, "--out", str(tmp_path / "d")]
    cmd[cmd.index("--pretrain-epochs"):cmd.index("--pretrain-epochs") + 2] = ["--checkpoint", str(tmp_path / "bad.pt")]
    assert main(cmd) == 2
    assert "does not fit CifarResNet" in capsys.readouterr().err


def test_unstructured_run_keeps_masks_and_exports_packed_weights(tmp_path):
    out, s = run(tmp_path, "l1", "--granularity", "weight")
    assert not s["pruned"]["compacted"] and s["sparse_bytes"]["bitmap"] < s["sparse_bytes"]["dense"]
    model = gf.load(out / "model.pt")
    packed = torch.load(out / "sparse.pt", weights_only=True)
    for name, p in packed["layers"].items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(gf.sparse.unpack(p), w)
        assert int((w == 0).sum()) >= gf.n_prune_for(0.5, w.numel())


def test_checkpoint_starts_from_given_dense_weights(tmp_path):
    out, first = run(tmp_path, "l1")
    dense = gf.models.create("resnet20", in_channels=1)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    cmd = ["prune", "--method", "l1", *TINY, "--out", str(tmp_path / "from_ckpt")]
    i = cmd.index("--pretrain-epochs")
    cmd[i:i + 2] = ["--checkpoint", str(tmp_path / "dense.pt")]
    assert main(cmd) == 0
    s = json.loads((tmp_path / "from_ckpt" / "summary.json").read_text())
    assert s["wall_time_s"]["pretrain"] < first["wall_time_s"]["pretrain"] + 5
    assert "pretrain" not in [json.loads(l)["stage"] for l in (tmp_path / "from_ckpt" / "metrics.jsonl").read_text().splitlines()]


def test_a_checkpoint_from_other_code_is_trained_further_dense(tmp_path, capsys):
    dense = gf.models.create("resnet20", in_channels=1)
    sd = {"module." + k.replace("fc.", "linear."): v for k, v in dense.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 200}, tmp_path / "foreign.th")
    out, s = run(tmp_path, "l1", "--checkpoint", str(tmp_path / "foreign.th"))  # TINY: --pretrain-epochs 1
    err = capsys.readouterr().err
    assert "stripped the prefix 'module.'" in err and "renamed linear.* -> fc.*" in err
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("pretrain") == 1  # an epoch of dense training after loading
    model = gf.models.create("resnet20", in_channels=1)
    gf.load_weights(model, tmp_path / "foreign.th")
    data = gf.data.load("digits")
    with torch.no_grad():
        x, y = data.test.tensors
        as_given = 100 * float((model.eval()(x).argmax(1) == y).float().mean())
    assert abs(s["dense"]["test_acc"] - as_given) > 5, (s["dense"]["test_acc"], as_given)


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "eager" in text and "available" in text


def test_demo_keeps_its_promise(tmp_path, capsys):
    """The README's main job: dense >= 95% on digits, GReg-1 at 0.5 within 2 points of it."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert s["dense"]["test_acc"] >= 95.0
    assert s["pruned"]["test_acc"] >= s["dense"]["test_acc"] - 2.0
    assert s["flops_reduction"] > 1.9 and s["method"] == "greg1" and s["ratio"] == 0.5
    assert "FLOPs" in capsys.readouterr().out


def test_ratio_zero_runs_to_the_end_and_removes_nothing(tmp_path):
    out, s = run(tmp_path, "greg1", "--ratio", "0")
    assert s["pruned"]["params"] == s["dense"]["params"] and s["layers_pruned"] == 0
    assert (out / "model.pt").is_file()


def test_single_layers_penalized_as_groups_say_so(tmp_path, capsys):
    out, s = run(tmp_path, "greg1", "--no-coupled", "--penalize", "group")
    assert s["coupled"] is False and s["penalize"] == "group" and s["layers_pruned"] == 9  # the inner convs
    assert "pruned (greg1 filter, penalize group ratio 0.5)" in capsys.readouterr().out


def test_a_run_from_before_coupled_groups_resumes_with_no_coupled(tmp_path, capsys):
    """Checkpoints written before --coupled existed planned single layers: resuming one names the
    flag that reproduces that plan, and with it the run goes on."""
    args = ["prune", "--method", "greg1", *TINY, "--checkpoint-every", "3", "--no-coupled"]
    out = tmp_path / "old"
    env = {**os.environ, "GREG_FAST_KILL_AT": "regularize:4"}
    proc = subprocess.run([sys.executable, "-m", "greg_fast.cli", *args, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    for path in (out / "checkpoints").glob("ckpt-*.pt"):  # as an older greg_fast wrote them
        ckpt = torch.load(path, weights_only=True)
        for key in ("coupled", "approximate", "penalize"):
            del ckpt["identity"][key]
        del ckpt["settings"]
        torch.save(ckpt, path)
    plain = [a for a in args if a != "--no-coupled"]
    assert main([*plain, "--out", str(out), "--resume", str(out)]) == 2
    assert "coupled=False (now None)" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["coupled"] is False


def budget_args(*target):
    """TINY with a target in place of --ratio 0.5."""
    i = TINY.index("--ratio")
    return [*TINY[:i], *TINY[i + 2:], *target]


def test_prune_to_a_flops_budget_reports_planned_and_measured_against_the_target(tmp_path, capsys):
    out = tmp_path / "budget"
    args = ["prune", "--method", "greg1", *budget_args("--target-flops", "2x", "--allocation", "global",
                                                       "--round-to", "4"), "--out", str(out)]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    t = s["target"]
    assert t["kind"] == "flops" and t["keep"] == 0.5 and t["allocation"] == "global" and t["round_to"] == 4
    assert t["met"] and 0.5 * 0.95 <= t["measured"]["flops_kept"] <= 0.5
    assert t["planned"]["flops_kept"] == pytest.approx(t["measured"]["flops_kept"], rel=1e-6)
    assert "target" in capsys.readouterr().out
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    widths = [w.shape[0] for k, w in state.items() if k.endswith("conv1.weight")]
    assert all(w % 4 == 0 for w in widths)


def test_a_latency_budget_is_measured_once_and_a_killed_run_resumes_with_its_allocation(tmp_path):
    args = ["prune", "--method", "greg2", *budget_args("--target-latency", "1.1x", "--latency-batch-size", "16",
                                                       "--allocation", "global"), "--checkpoint-every", "3"]
    killed = tmp_path / "killed"
    env = {**os.environ, "GREG_FAST_KILL_AT": "regularize:4", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-m", "greg_fast.cli", *args, "--out", str(killed)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    saved = torch.load(sorted((killed / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
    allocation = saved["state"]["results"]["allocation"]
    assert allocation["achieved"]["latency"]["batch_size"] == 16
    import greg_fast.budget
    real = greg_fast.budget.measure_speedup
    calls = []
    greg_fast.budget.measure_speedup = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert main([*args, "--out", str(killed), "--resume", str(killed)]) == 0
    finally:
        greg_fast.budget.measure_speedup = real
    assert calls == []  # the resumed run took the allocation back instead of measuring again
    t = json.loads((killed / "summary.json").read_text())["target"]
    assert t["kind"] == "latency" and t["batch_size"] == 16
    assert t["planned"]["latency_speedup"] == allocation["achieved"]["latency"]["speedup"]
    assert "latency_speedup" in t["measured"] and len(t["measured"]["latency_speedup_p10_p90"]) == 2


@pytest.mark.parametrize("flags,message", [
    (["--target-flops", "0"], "must be in (0, 1]"),
    (["--target-params", "1.5"], "must be in (0, 1]"),
    (["--target-flops", "2x", "--ratio", "0.5"], "not allowed with argument"),
    (["--ratio", "0.5", "--allocation", "global"], "needs --target-flops"),
    (["--target-flops", "2x", "--max-ratio", "1.2"], "--max-ratio must be in (0, 1)"),
    (["--target-flops", "0.01"], "reachable range"),
    (["--target-flops", "2x", "--round-to", "128"], "larger than every group"),
])
def test_bad_budget_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    try:
        code = main(["prune", "--method", "l1", *budget_args(*flags), "--out", str(out)])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("*.pt"))


def test_a_model_that_shrinks_the_images_to_one_pixel_is_refused_with_a_size_that_fits(tmp_path, capsys):
    args = [*TINY, "--out", str(tmp_path / "r18")]
    args[args.index("resnet20")] = "resnet18"
    assert main(["prune", "--method", "greg1", *args]) == 2
    assert ("shrinks the 8x8 images of --data digits to 1x1 before 11 of its convolutions with kernels over 1x1 "
            "(from `layer2.0.conv2` on): they would see mostly padding. Use --image-size 64 or more") in capsys.readouterr().err
    assert not (tmp_path / "r18").exists()
    assert not models.collapsed_convs(models.create("resnet20"), (torch.zeros(1, 3, 8, 8),))  # made for small images


def test_latency_can_be_skipped_or_taken_at_chosen_batch_sizes(tmp_path, capsys):
    out = tmp_path / "none"
    assert main(["prune", "--method", "l1", *TINY, "--out", str(out), "--no-latency"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["speedup"] == {} and not any(k.startswith("latency_ms") for k in s["pruned"])
    assert "not measured (--no-latency)" in capsys.readouterr().out
    out = tmp_path / "some"
    assert main(["prune", "--method", "l1", *TINY, "--out", str(out), "--latency-batch-sizes", "2,8",
                 "--latency-seconds", "0.5"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert list(s["speedup"]) == ["batch2", "batch8"] and s["speedup_largest_batch"] == "batch8"
    assert "CPU latency b8 (ms)" in capsys.readouterr().out
    for bad in ("0", "1,x"):
        with pytest.raises(SystemExit):
            main(["prune", "--method", "l1", *TINY, "--out", str(tmp_path / "bad"), "--latency-batch-sizes", bad])
    assert main(["prune", "--method", "l1", *TINY, "--out", str(tmp_path / "bad"), "--latency-seconds", "0"]) == 2
    assert "--latency-seconds must be a finite number > 0" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_named_with_the_ones_it_has(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["prune", "--method", "l1", *TINY, "--out", str(tmp_path / "r")], ["bench"]):
        try:
            code = main([*command, "--device", "cuda"])
        except SystemExit as exit:  # bench's argparse error
            code = exit.code
        assert code == 2
        assert "--device cuda: no CUDA device is available on this machine; available: cpu" in capsys.readouterr().err
    assert main(["prune", "--method", "l1", *TINY, "--out", str(tmp_path / "r"), "--device", "gpu"]) == 2
    assert "--device gpu: not a device name" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


class _GroupNormNet(torch.nn.Sequential):  # one channel group that only an approximate plan cuts
    def __init__(self, num_classes, in_channels=3):
        super().__init__(torch.nn.Conv2d(in_channels, 16, 3, padding=1), torch.nn.GroupNorm(2, 16), torch.nn.ReLU(),
                         torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                         torch.nn.Flatten(), torch.nn.Linear(16, num_classes))


def test_approximate_prints_the_measured_output_change_in_the_final_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "create", lambda name, num_classes, in_channels=3, **kw: _GroupNormNet(num_classes, in_channels))
    out = tmp_path / "approx"
    assert main(["prune", "--method", "l1", *TINY, "--out", str(out), "--approximate", "--no-latency"]) == 0
    change = json.loads((out / "summary.json").read_text())["output_change"]
    assert change > 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("output change"))
    assert f"{change:.3g} (max |compacted - masked| / max |masked|)" in row
