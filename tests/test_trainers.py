"""GrowingReg inside other people's training code: timm's optimizer and scheduler factories (the
README's example), a scheduler of the wrapper sized by max_steps."""
import pytest
import torch

import greg_fast as gf
from greg_fast import data as datasets

timm = pytest.importorskip("timm", reason="timm is a test dependency")


def test_timms_factories_build_the_inner_optimizer_and_a_scheduler_of_the_wrapper():
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    torch.manual_seed(0)
    model = gf.models.create("resnet20")
    plan = gf.plan(model, 0.5)
    opt = gf.GrowingReg(create_optimizer_v2(model, "sgd", lr=1e-3, momentum=0.9), plan, method="greg2", delta=0.25,
                        interval=1, stabilize=2, pick_delta=0.005, pick_ceiling=0.01, mag_ratio_limit=1e12)
    scheduler, _ = create_scheduler_v2(opt, "cosine", num_epochs=1, updates_per_epoch=opt.max_steps(),
                                       step_on_epochs=False, warmup_epochs=0)
    lrs, n = [], 0
    while not opt.done:
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
        n += 1
        scheduler.step_update(n)
        lrs.append(opt.param_groups[0]["lr"])
    assert n == opt.max_steps() == 8 and lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-3
    assert opt.optimizer.param_groups[0]["lr"] == lrs[-1]  # the wrapper's groups are the inner optimizer's


def test_lightning_regularizes_then_compacts_and_fine_tunes_in_one_fit(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is a test dependency")
    from greg_fast.lightning import GRegCallback
    from lightning_ddp import DigitsModule

    torch.manual_seed(0)
    data = datasets.load("digits")
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True)
    module = DigitsModule(scheduler=True)
    params_before = sum(p.numel() for p in module.net.parameters())
    steps = []
    callback = GRegCallback(module.net, make_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: steps.append(step) or 0.5))
    regularize = module.configure_optimizers()["optimizer"].max_steps()
    trainer = pl.Trainer(max_steps=regularize + 10, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    assert callback.compacted and trainer.global_step == regularize + 10
    assert sum(p.numel() for p in module.net.parameters()) == module.plan.cost()["params_after"] < params_before
    assert trainer.optimizers[0] is module.greg.optimizer and len(steps) >= 10  # the inner SGD, its own schedule
    x, y = data.test.tensors
    with torch.no_grad():
        assert module.net.eval()(x).shape == (len(y), 10)


def test_lightning_resumes_a_checkpoint_saved_after_compaction_bit_exactly(tmp_path):
    """Run A: regularize, compact in epoch 0, fine-tune to epoch 3, a checkpoint every epoch. Run B: a
    fresh (dense) module resumed from A's epoch-1 checkpoint is shrunk before the weights load and
    ends where A ended, bit for bit (optimizer momentum and LR schedule restored)."""
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is a test dependency")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from greg_fast.lightning import GRegCallback
    from lightning_ddp import DigitsModule

    data = datasets.load("digits")
    loader = torch.utils.data.DataLoader(data.train, batch_size=128)  # the same batches on resume

    def fit(ckpt_path=None, **callback):
        module = DigitsModule()
        callback = GRegCallback(module.net, **callback)
        trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback, ModelCheckpoint(tmp_path, "{epoch}", save_top_k=-1)],
                             default_root_dir=tmp_path)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return module, callback

    make = dict(make_optimizer=lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
                make_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.8))
    a, callback = fit(**make)
    assert callback.compacted
    b, resumed = fit(tmp_path / "epoch=1.ckpt", **make)
    assert resumed.compacted and "configure_optimizers" not in vars(b)  # its own hooks back after the fit
    for (name, x), y in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(x, y), name
    assert b.net.layer3[0].conv1.out_channels == 32
    with pytest.raises(ValueError, match="needs GRegCallback\\(make_optimizer=...\\)"):
        fit(tmp_path / "epoch=1.ckpt")
    with pytest.raises(ValueError, match="has LR scheduler state: give GRegCallback the make_scheduler"):
        fit(tmp_path / "epoch=1.ckpt", make_optimizer=make["make_optimizer"])


def test_lightning_callback_under_ddp_wraps_the_compacted_model_again(tmp_path):
    """Two gloo ranks under torchrun (tests/lightning_ddp.py): after compaction DDP syncs the small
    model's gradients (the old wrapper would fail on parameters it no longer sees), so both ranks
    fine-tune to the same weights; BatchNorm running statistics stay per rank, as DDP leaves them."""
    pytest.importorskip("lightning.pytorch", reason="lightning is a test dependency")
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).with_name("lightning_ddp.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["compacted"] for r in ranks) and ranks[0]["step"] == ranks[1]["step"]
    state = ranks[0]["state"]
    assert state["layer3.0.conv1.weight"].shape[0] == 32  # half of 64 went
    for key, value in state.items():
        if "running_" not in key and "num_batches" not in key:
            assert torch.equal(value, ranks[1]["state"][key]), key
