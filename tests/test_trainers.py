"""GrowingReg inside other people's training code: timm's optimizer and scheduler factories (the
README's example), a scheduler of the wrapper sized by max_steps."""
import pytest
import torch

import greg_fast as gf

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
