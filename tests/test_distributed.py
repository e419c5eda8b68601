"""GrowingReg under DistributedDataParallel: 2 processes with gloo on CPU agree with each other and
with one process over the same global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import greg_fast as gf

X = torch.zeros(1, 3, 6, 6)
HYPER = dict(delta=0.2, interval=2, ceiling=0.5, stabilize=3, pick_delta=0.1, pick_ceiling=0.2,
             recover=-0.02, mag_ratio_limit=1e9, backend="auto")
STEPS = 18


class NoNormNet(nn.Module):
    """No BatchNorm: per-rank batch statistics would differ from the global batch's by design."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 13, 3, padding=1)
        self.fc = nn.Linear(13 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))


def global_batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(4)]


def train(model, greg, batches, rank=0, world=1, step=None):
    step = step or greg.step
    for i in range(STEPS):
        x, y = batches[i % len(batches)]
        part = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
        greg.zero_grad()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        step()


def build(method):
    torch.manual_seed(0)
    net = NoNormNet()
    plan = gf.plan(net, 0.5, example_inputs=X)
    return net, plan


def worker(rank, world, init_file, method, compiled, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net, plan = build(method)
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        greg = gf.GrowingReg(opt, plan, method=method, capturable=compiled, **HYPER)
        step = torch.compile(greg.step, fullgraph=True) if compiled else None
        train(ddp, greg, global_batches(), rank, world, step)
        torch.save({"state": net.state_dict(), "masks": greg.masks(), "phase": greg.phase},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method,compiled", [("greg1", False), ("greg2", False), ("greg2", True)])
def test_two_gloo_ranks_agree_with_one_process_over_the_global_batch(tmp_path, method, compiled):
    """compiled: a capturable GrowingReg's step under torch.compile(fullgraph=True), its device
    schedule taking rank 0's decisions through a functional collective (one broadcast a step)."""
    mp.spawn(worker, args=(2, str(tmp_path / "init"), method, compiled, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    net, plan = build(method)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    greg = gf.GrowingReg(opt, plan, method=method, **HYPER)
    train(net, greg, global_batches())
    assert greg.phase == "done" and ranks[0]["phase"] == ranks[1]["phase"] == "done"
    for name, kept in greg.masks().items():
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name])
        assert torch.equal(ranks[0]["masks"][name], kept)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-5)
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key])


def test_prune_job_runs_under_torchrun_with_rank0_writing(tmp_path):
    import json
    import subprocess
    import sys
    out = tmp_path / "ddp"
    args = ["--model", "resnet20", "--data", "digits", "--method", "greg1", "--ratio", "0.5",
            "--pretrain-epochs", "1", "--lr-pretrain", "0.05", "--batch-size", "128", "--lr-reg", "0.01",
            "--delta", "0.25", "--interval", "2", "--stabilize", "3", "--finetune-epochs", "1",
            "--lr-ft", "0:0.01", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "greg_fast.cli", "prune", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy (%)") == 1  # one table: rank 0 reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers_pruned"] == 10 and summary["pruned"]["params"] < summary["dense"]["params"]
    assert gf.load(out / "model.pt").layer3[0].conv1.out_channels == 32
