"""capturable=True: the schedule lives in device tensors and no step reads back to the host. Each
test runs the same training twice, host mode and capturable, and compares them step by step."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import greg_fast as gf

from conftest import SmallNet, make_batches

X = torch.zeros(1, 3, 6, 6)
# every phase in a few steps: GReg-1 stops growing at iteration 12, GReg-2 picks at iteration 6;
# both reach done before 30 steps
FAST = dict(delta=0.02, interval=2, ceiling=0.1, stabilize=3, pick_delta=0.01, pick_ceiling=0.03,
            mag_ratio_limit=1e12)


class Residual(nn.Module):
    """A residual add: one coupled group of two producers, its BatchNorms and a consumer."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))
        return self.head(x.mean((2, 3)))


def inner_optimizer(net, opt):
    if opt.startswith("sgd"):
        return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                               fused=opt == "sgd-fused")
    cls = torch.optim.Adam if opt.startswith("adam-") else torch.optim.AdamW
    return cls(net.parameters(), lr=1e-2, weight_decay=1e-3, fused=opt.endswith("fused"))


def pair(method="greg1", backend="cpp", fused=False, opt="sgd", net_cls=SmallNet, **kwargs):
    """The same model and GrowingReg twice: host mode, then capturable."""
    torch.manual_seed(0)
    net = net_cls()
    out = []
    for capturable in (False, True):
        model = copy.deepcopy(net)
        plan = gf.plan(model, 0.5, example_inputs=X)
        greg = gf.GrowingReg(inner_optimizer(model, opt), plan, method=method, backend=backend, fused=fused,
                             capturable=capturable, **{**FAST, **kwargs})
        out.append((model, greg))
    return out


def backward(model, greg, batch, nan=False):
    x, y = batch
    greg.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if nan:  # one non-finite gradient: the guard skips the whole step
        next(model.parameters()).grad.view(-1)[0] = float("nan")


def assert_same(a, b, step):
    (net_a, greg_a), (net_b, greg_b) = a, b
    for (k, x), y in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(x, y), f"step {step}: {k}"
    assert greg_a.phase == greg_b.phase and greg_a.iteration == greg_b.iteration, step
    assert greg_a.skipped_steps == greg_b.skipped_steps, step
    assert greg_a.lambdas() == greg_b.lambdas(), step
    assert all(torch.equal(m, greg_b.masks()[k]) for k, m in greg_a.masks().items()), step


def run_both(runs, steps, nan_at=(), step_b=None):
    """``steps`` steps of both runs on the same batches, compared after each; ``step_b`` replaces
    the capturable run's ``greg.step`` (a compiled one)."""
    batches = make_batches()
    phases = set()
    for i in range(steps):
        for j, (model, greg) in enumerate(runs):
            backward(model, greg, batches[i % len(batches)], nan=i in nan_at)
            (step_b if j and step_b else greg.step)()
        assert_same(*runs, i)
        phases.add(runs[0][1].phase)
    return phases


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("method", ["greg1", "greg2"])
def test_a_capturable_step_equals_the_host_step_through_every_phase(method, backend, fused):
    runs = pair(method, backend, fused, opt="sgd-fused" if fused else "sgd")
    phases = run_both(runs, 30, nan_at=(0, 5, 17))
    assert phases >= {"grow", "stabilize", "done"} and runs[1][1].skipped_steps == 3


@pytest.mark.parametrize("opt", ["sgd-fused", "adam-fused", "adamw", "adamw-fused"])
def test_inner_optimizers_are_skipped_on_the_device_exactly(opt):
    """A fused inner optimizer skips through found_inf; any other steps, then is put back."""
    run_both(pair("greg2", "eager", opt=opt), 16, nan_at=(0, 3, 4))


@pytest.mark.parametrize("method,fused", [("greg1", True), ("greg2", False)])
def test_the_triton_op_steps_like_the_host_launch_through_every_phase(method, fused):
    """The registered op reads the mask and skip flags on the device; the host launch is told them."""
    runs = pair(method, "triton", fused, opt="sgd-fused" if fused else "sgd")
    phases = run_both(runs, 30, nan_at=(0, 5, 17))
    assert phases >= {"grow", "stabilize", "done"} and runs[1][1].skipped_steps == 3


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_coupled_group_plan_steps_like_the_host(backend):
    runs = pair("greg2", backend, net_cls=Residual)
    assert any(l.coupled for l in runs[0][1].plan.pruned)
    assert "done" in run_both(runs, 30, nan_at=(2,))


@pytest.mark.parametrize("backend,method,fused,net_cls", [
    ("cpp", "greg1", True, SmallNet), ("cpp", "greg2", False, SmallNet),
    ("triton", "greg1", True, SmallNet), ("triton", "greg2", False, Residual), ("eager", "greg2", True, Residual)])
def test_the_step_compiles_into_one_graph_in_every_phase_and_equals_eager(backend, method, fused, net_cls):
    """fullgraph and no recompile as the phase changes (its hyper-parameters stay fixed). A
    compiled fused optimizer cannot take found_inf, so the inner SGD here is foreach."""
    torch._dynamo.reset()
    runs = pair(method, backend, fused, net_cls=net_cls)
    model, greg = runs[1]
    batches = make_batches()
    for phase in range(2):  # explain in a grow step and in a masked step after pruning
        backward(model, greg, batches[0])
        explained = torch._dynamo.explain(copy.deepcopy(greg).step)()
        assert explained.graph_break_count == 0, explained.break_reasons
        if phase == 0:
            for _ in range(30):
                backward(model, greg, batches[0])
                greg.step()
            assert greg.done
    torch._dynamo.reset()
    runs = pair(method, backend, fused, net_cls=net_cls)
    compiled = torch.compile(runs[1][1].step, fullgraph=True, backend="aot_eager")
    # the first compiled optimizer step adds "capturable" to the param groups (torch's own doing):
    # one recompile at the second step, none after, whatever the phase
    run_both(runs, 2, step_b=compiled)
    with torch._dynamo.config.patch(error_on_recompile=True):
        phases = run_both(runs, 28, nan_at=(3,), step_b=compiled)
    assert phases >= {"grow", "stabilize", "done"}
    torch._dynamo.reset()


@pytest.mark.parametrize("backend,fused", [("cpp", False), ("triton", True)])
def test_a_compiled_training_step_equals_eager(backend, fused):
    """forward, backward and opt.step() compiled together."""
    torch._dynamo.reset()
    runs = pair("greg1", backend, fused)
    batches = make_batches()

    def train_step(model, greg, x, y):
        greg.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        greg.step()
        return loss

    compiled = torch.compile(train_step, backend="aot_eager")
    for i in range(24):
        x, y = batches[i % len(batches)]
        train_step(*runs[0], x, y)
        compiled(*runs[1], x, y)
    (net_a, greg_a), (net_b, greg_b) = runs
    assert greg_a.done and greg_b.done
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
    assert all(torch.equal(m, greg_b.masks()[k]) for k, m in greg_a.masks().items())
    torch._dynamo.reset()


def test_a_tensor_learning_rate_is_read_on_the_device():
    torch.manual_seed(0)
    runs = []
    for lr, capturable in ((0.05, False), (torch.tensor(0.05), True)):
        model = SmallNet()
        torch.manual_seed(0)
        model.load_state_dict(runs[0][0].state_dict()) if runs else None
        inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        plan = gf.plan(model, 0.5, example_inputs=X)
        runs.append((model, gf.GrowingReg(inner, plan, fused=True, capturable=capturable, backend="cpp", **FAST)))
    run_both(runs, 4)
    runs[0][1].param_groups[0]["lr"] = 0.02
    runs[1][1].param_groups[0]["lr"].fill_(0.02)  # in place: what a captured graph sees
    run_both(runs, 4)


def test_too_many_skipped_steps_raise_where_the_user_checks():
    (_, host), (model, greg) = pair(max_skipped_in_a_row=3)
    batch = make_batches()[0]
    for _ in range(3):
        backward(model, greg, batch, nan=True)
        greg.step()  # counted on the device, no raise inside the step
    assert greg.skipped_steps == 3 and greg.iteration == 0
    with pytest.raises(RuntimeError, match="3 steps in a row had non-finite gradients"):
        greg.check()
    backward(model, greg, batch)
    greg.step()
    greg.check()  # a finite step resets the run
    assert greg.iteration == 1 and greg.skipped_steps == 3


@pytest.mark.parametrize("at", [5, 20])
def test_checkpoints_move_between_host_and_capturable_runs(at):
    runs = pair("greg2", "cpp", fused=True, opt="sgd-fused")
    run_both(runs, at)
    (net_a, greg_a), (net_b, greg_b) = runs
    saved = []
    for model, greg in runs:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "greg": greg.state_dict()}, buf)
        buf.seek(0)
        saved.append(torch.load(buf, weights_only=True))
    assert same(saved[0]["greg"]["greg"], saved[1]["greg"]["greg"])  # one format: the host's
    resumed = pair("greg2", "cpp", fused=True, opt="sgd-fused")
    for (model, greg), ckpt in zip(resumed, reversed(saved)):  # the host run resumes the capturable one
        model.load_state_dict(ckpt["model"])
        greg.load_state_dict(ckpt["greg"])
    assert_same(resumed[0], runs[0], at)
    assert_same(resumed[1], runs[1], at)
    run_both(resumed, 30 - at)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def refused(match, opt=None, **kwargs):
    model = SmallNet()
    opt = opt(model.parameters()) if opt else torch.optim.SGD(model.parameters(), lr=0.1)
    plan_kwargs = {"example_inputs": X, **kwargs.pop("plan", {})}
    ratio = None if "target" in plan_kwargs else 0.5
    with pytest.raises(ValueError, match=match):
        gf.GrowingReg(opt, gf.plan(model, ratio, **plan_kwargs), capturable=True, **kwargs)


def test_what_a_capturable_step_cannot_run_is_refused_with_what_to_change():
    refused("LBFGS: its step re-evaluates a closure", opt=lambda p: torch.optim.LBFGS(p))
    refused("not Adagrad: pass nan_guard=False", opt=lambda p: torch.optim.Adagrad(p))
    refused("without dampening", opt=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5))
    refused("needs structured layers", plan={"granularity": "weight"})
    refused("GReg-2 on a global budget", method="greg2", plan={"target": {"params": "2x"}, "allocation": "global"})
    model = SmallNet()  # what the guard refused runs without it
    gf.GrowingReg(torch.optim.Adagrad(model.parameters()), gf.plan(model, 0.5, example_inputs=X),
                  capturable=True, nan_guard=False).step()


@pytest.mark.skipif(gf.ops.unavailable() is not None, reason="the C++ extension is not built")
def test_the_cpp_step_ops_have_fake_kernels_that_pass_torchs_op_checks():
    # opcheck checks each op's schema and its fake and AOT dispatch; it passes even without a fake
    # kernel (FakeTensor then runs the real op), so the registry check below is what fails then
    from conftest import fake_layer
    layers = [fake_layer(s, "filter", torch.float32, torch.device("cpu")) for s in ((7, 3, 3, 3), (5, 7))]
    weights = [l.weight.detach().clone() for l in layers]
    grads = [l.weight.grad.clone() for l in layers]
    kept = [torch.rand(l.n_groups) < 0.5 for l in layers]
    lam = torch.full((2,), 0.1)
    views = gf.ops.flat_views([l.view for l in layers])
    scores = torch.empty(sum(l.n_groups for l in layers))
    hyper = gf.ops.sgd_hyper([0.1, 0.1], [0.9, 0.9], [1e-4, 1e-4])
    no, yes = torch.tensor(False), torch.tensor(True)
    ops = torch.ops.greg_fast
    for op, args in [
        (ops.scores_.default, (weights, views, scores)),
        (ops.penalty_.default, (weights, grads, kept, lam, lam, views, yes, scores, [])),
        (ops.fused_sgd_.default, (weights, grads, [torch.zeros_like(w) for w in weights], kept, lam, lam, hyper,
                                  views, no, no, scores)),
    ]:
        torch.library.opcheck(op, args)
    from torch._library import simple_registry
    for name in ("scores_", "penalty_", "fused_sgd_"):
        assert simple_registry.singleton.find(f"greg_fast::{name}").fake_impl.kernel is not None, name


def test_under_inductor_the_step_equals_eager_to_float_rounding():
    """The default backend generates its own kernels (fused multiply-adds, other orders of summation):
    the parameters then agree to float32 rounding, not bit for bit (torch's own compiled SGD does
    the same), and the schedule's decisions are the same."""
    torch._dynamo.reset()
    runs = pair("greg1", "eager", False)
    compiled = torch.compile(runs[1][1].step)  # inductor
    batches = make_batches()
    worst = 0.0
    for i in range(12):
        for j, (model, greg) in enumerate(runs):
            backward(model, greg, batches[i % len(batches)])
            (compiled if j else greg.step)()
        for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
            worst = max(worst, float(((a - b).abs().max() / a.abs().max()).detach()))
        assert runs[0][1].phase == runs[1][1].phase and runs[0][1].lambdas() == runs[1][1].lambdas()
    assert worst < 1e-5  # float32 rounding of the weights (1e-7 a step here), not bit for bit
    assert all(torch.equal(m, runs[1][1].masks()[k]) for k, m in runs[0][1].masks().items())
    torch._dynamo.reset()


def test_a_compiled_model_recompiles_after_compact_and_computes_the_small_model():
    torch._dynamo.reset()
    model = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = gf.plan(model, 0.5, example_inputs=x[:1])
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x)
    masks = {l.name: torch.arange(l.n_groups) % 2 == 0 for l in plan.layers}
    gf.compact(model, masks, plan)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))  # its guards on the weights' shapes fail: compiled again
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames
    torch._dynamo.reset()
