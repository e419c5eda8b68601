"""Every compiled backend against the eager reference: kernel calls on random shapes, and whole
GrowingReg runs through grow, pick, stabilize and the masked phase."""
import dataclasses
import os

import pytest
import torch
import torch.nn as nn

import greg_fast as gf
from greg_fast import backend as dispatch
from greg_fast import ops
from greg_fast.backend import SGDArgs, StepBatch, base, cpp, eager
from greg_fast.backend import triton as triton_backend
from greg_fast.units import LayerPlan

from conftest import SHAPES, SmallNet, fake_layer, make_batches, row_and_column_slices, train_steps

CUDA = torch.cuda.is_available()
DEVICE = {"cpp": torch.device("cpu"), "triton": torch.device("cuda" if CUDA else "cpu")}
BACKENDS = [name for name, mod in (("cpp", cpp), ("triton", triton_backend))
            if mod.unavailable(DEVICE[name]) is None]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=1e-3, atol=1e-3)}


def test_the_compiled_backends_are_here():
    """CI builds the extension and has triton: a silent skip of every comparison is a failure."""
    assert "cpp" in BACKENDS and "triton" in BACKENDS


def test_the_extension_runs_on_torchs_own_openmp_runtime():
    """A second OpenMP runtime beside torch's keeps a second thread pool spinning against torch's
    on every parallel region (a training step under GrowingReg cost 2.7x a plain one that way)."""
    import greg_fast._C  # noqa: F401
    with open("/proc/self/maps") as fh:
        runtimes = {os.path.realpath(line.split()[-1]) for line in fh if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def clone_layers(layers):
    out = []
    for l in layers:
        m = nn.Module()
        m.weight = nn.Parameter(l.weight.detach().clone())
        m.weight.grad = l.weight.grad.clone()
        out.append(LayerPlan(l.name, m, l.granularity, l.n_groups, l.n_prune, l.ratio, l.view))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", gf.GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["penalty", "penalty_masked", "sgd", "sgd_masked", "sgd_plain"])
@pytest.mark.parametrize("layout", ["odd", "aligned", "misaligned"])
def test_kernel_matches_eager_on_random_shapes(backend, granularity, dtype, op, layout):
    device = DEVICE[backend]
    shapes = SHAPES["aligned" if layout == "misaligned" else layout][granularity]
    layers = [fake_layer(s, granularity, dtype, device, sp, misaligned=layout == "misaligned") for s, sp in shapes]
    kept = [torch.rand(l.n_groups, device=device) < 0.6 for l in layers]
    if granularity == "weight":  # unstructured layers keep their masks bit-packed
        kept = [gf.masks.pack_bits(k) for k in kept]
    lam_kept = torch.rand(len(layers), device=device) * 0.1 - 0.05
    lam_kept[::2] = 0  # GReg-1's kept groups: the gradient is left alone
    lam_sel = torch.rand(len(layers), device=device)
    ref = clone_layers(layers)
    mask = op.endswith("masked")
    module = {"cpp": cpp, "triton": triton_backend}[backend]
    if op.startswith("penalty"):
        got = module.step(StepBatch(layers, kept, lam_kept, lam_sel), want_scores=not mask, mask=mask)
        want = eager.step(StepBatch(ref, kept, lam_kept, lam_sel), want_scores=not mask, mask=mask)
    else:
        bufs = [None if op == "sgd_plain" else torch.randn_like(l.weight) for l in layers]
        ref_bufs = [None if b is None else b.clone() for b in bufs]
        hyper = ([0.1] * len(layers), [0.0 if op == "sgd_plain" else 0.9] * len(layers), [1e-3] * len(layers))
        got = module.step(StepBatch(layers, kept, lam_kept, lam_sel, SGDArgs(bufs, *hyper)),
                          want_scores=not mask, mask=mask)
        want = eager.step(StepBatch(ref, kept, lam_kept, lam_sel, SGDArgs(ref_bufs, *hyper)),
                          want_scores=not mask, mask=mask)
        for b, rb in zip(bufs, ref_bufs):
            if b is not None:
                torch.testing.assert_close(b, rb, **TOL[dtype])
    for l, r in zip(layers, ref):
        torch.testing.assert_close(l.weight.detach(), r.weight.detach(), **TOL[dtype])
        torch.testing.assert_close(l.weight.grad, r.weight.grad, **TOL[dtype])
    if mask:
        assert got is None and want is None
    else:
        for g, w in zip(got, want):  # scores accumulate in fp32 whatever the weights' dtype
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", gf.GRANULARITIES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layout,dtype", [("odd", torch.float32), ("aligned", torch.bfloat16)])
def test_mask_and_skip_flags_read_on_the_device_match_eager(backend, granularity, fused, layout, dtype):
    """A capturable step's mask and skip are 0-d tensors the kernel reads (triton: through its
    registered op), never the host: every combination of their values against eager's. In the odd
    layout a float64 layer (which the kernels do not take) goes to eager inside the step, so the
    others' per-layer hyper-parameters must follow them into the split."""
    device = DEVICE[backend]
    module = {"cpp": cpp, "triton": triton_backend}[backend]
    for mask_on, skip_on in ((False, False), (True, False), (False, True), (True, True)):
        mask, skip = torch.tensor(mask_on, device=device), torch.tensor(skip_on, device=device)
        layers = [fake_layer(s, granularity, dtype, device, sp) for s, sp in SHAPES[layout][granularity]]
        if layout == "odd":
            shape, spatial = SHAPES[layout][granularity][0]
            layers.insert(1, fake_layer(shape, granularity, torch.float64, device, spatial))
        kept = [torch.rand(l.n_groups, device=device) < 0.6 for l in layers]
        if granularity == "weight":
            kept = [gf.masks.pack_bits(k) for k in kept]
        lam = (torch.rand(len(layers), device=device) * 0.1, torch.rand(len(layers), device=device))
        ref = clone_layers(layers)
        bufs, ref_bufs, sgd = [None] * len(layers), [None] * len(layers), (None, None)
        if fused:
            bufs = [torch.randn_like(l.weight) for l in layers]
            ref_bufs = [b.clone() for b in bufs]
            n = len(layers)
            hyper = ([0.05 * (i + 1) for i in range(n)], [0.9 - 0.1 * i for i in range(n)],
                     [1e-3 * (i + 1) for i in range(n)])
            sgd = (SGDArgs(bufs, *hyper, skip=skip), SGDArgs(ref_bufs, *hyper, skip=skip))
        got = module.step(StepBatch(layers, kept, *lam, sgd[0]), want_scores=True, mask=mask)
        want = eager.step(StepBatch(ref, kept, *lam, sgd[1]), want_scores=True, mask=mask)
        case = f"mask={mask_on} skip={skip_on}"
        for l, r, b, rb in zip(layers, ref, bufs, ref_bufs):
            torch.testing.assert_close(l.weight.detach(), r.weight.detach(), **TOL[dtype], msg=case)
            torch.testing.assert_close(l.weight.grad, r.weight.grad, **TOL[dtype], msg=case)
            if b is not None:
                torch.testing.assert_close(b, rb, **TOL[dtype], msg=case)
        # the schedule uses no scores of a skipped step, nor of a masked one (it is done)
        for g, w in zip(got if not (mask_on or skip_on) else (), want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=case)


def test_triton_work_list_splits_long_rows_except_when_scores_are_summed():
    views, cpu = ((1, 20, 5000, 100000), (1, 7, 9, 63)), torch.device("cpu")  # A, G, B, stride of A
    _, _, work, (block_g, block_b, _, b_step), _, _ = triton_backend._static(views, "filter", cpu, False)
    assert b_step % block_b == 0 and b_step < 5000  # programs stay short
    assert work.shape == (-(-20 // block_g) * -(-5000 // b_step) + -(-7 // block_g), 4)
    assert sorted(set(work[work[:, 0] == 0, 3].tolist())) == list(range(0, 5000, b_step))
    for granularity, views in (("filter", views), ("channel", ((40, 20, 9, 180), (33, 7, 1, 12)))):
        _, _, work, (block_g, _, a_step, b_step), _, _ = triton_backend._static(views, granularity, cpu, True)
        assert a_step == b_step == 0  # one program (one atomic add) per group: deterministic sums
        assert work[:, 1:].tolist() == [[g0, 0, 0] for _, g, _, _ in views for g0 in range(0, g, block_g)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_match_eager(backend):
    layers = [fake_layer(s, g, torch.float32, DEVICE[backend], sp)
              for shapes in SHAPES.values() for g in shapes for s, sp in shapes[g][:2]]
    module = {"cpp": cpp, "triton": triton_backend}[backend]
    for layer in layers:  # one granularity per call, as in a plan
        torch.testing.assert_close(module.scores([layer])[0], eager.scores([layer])[0], rtol=1e-5, atol=1e-7)


SCHEDULE = dict(delta=0.2, interval=2, ceiling=0.5, stabilize=3, pick_delta=0.1, pick_ceiling=0.2,
                recover=-0.02, mag_ratio_limit=1e9)


def run(backend, granularity, method, fused, steps=16, dtype=torch.float32, device="cpu", ratio=0.5,
        channels_last=False, capturable=False):
    torch.manual_seed(0)
    net = SmallNet().to(device=device, dtype=dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    plan = gf.plan(net, ratio, granularity=granularity, example_inputs=torch.zeros(1, 3, 6, 6, device=device,
                                                                                    dtype=dtype))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    greg = gf.GrowingReg(opt, plan, method=method, backend=backend, fused=fused, capturable=capturable, **SCHEDULE)
    phases = []
    batches = [(x.to(device, dtype), y.to(device)) for x, y in make_batches()]
    for i in range(steps):
        phases.append(greg.phase)
        train_steps(net, greg, batches, 1, start=i)
    return net, greg, phases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", gf.GRANULARITIES)
@pytest.mark.parametrize("method", ["greg1", "greg2"])
@pytest.mark.parametrize("fused", [False, True])
def test_growing_reg_runs_match_eager_through_every_phase(backend, granularity, method, fused):
    ref_net, ref, phases = run("eager", granularity, method, False)
    assert {"grow", "stabilize", "done"} <= set(phases) and (method == "greg1" or "pick" in phases)
    net, greg, got_phases = run(backend, granularity, method, fused, device=DEVICE[backend])
    assert got_phases == phases and greg.backend.name == backend
    for a, b in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-6)
    for name, kept in ref.masks().items():
        assert torch.equal(greg.masks()[name].cpu(), kept)
    for name, s in ref.scores().items():
        torch.testing.assert_close(greg.scores()[name].cpu(), s, rtol=1e-5, atol=1e-7)


def test_fused_sgd_matches_penalty_then_torch_sgd_in_eager():
    ref_net, _, _ = run("eager", "filter", "greg1", False)
    net, _, _ = run("eager", "filter", "greg1", True)
    for a, b in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_plan_and_bf16_runs(backend):
    net, greg, _ = run(backend, "filter", "greg1", False, steps=3, ratio=0.0, device=DEVICE[backend])
    assert greg.layers == [] and greg.done
    ref_net, _, _ = run("eager", "filter", "greg1", False, dtype=torch.bfloat16)
    net, _, _ = run(backend, "filter", "greg1", True, dtype=torch.bfloat16, device=DEVICE[backend])
    for a, b in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=0.05, atol=0.02)


LAYOUTS = {  # how the middle one of three layers is stored -> (granularity, does the kernel take it)
    "channels_last filters": ("filter", True),         # each filter is still one block
    "channels_last channels": ("channel", False),
    "channels_last single weights": ("weight", False),  # mask bits follow the NCHW order
    "gradient not like the weight": ("filter", False),
    "transposed linear": ("filter", False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask", [False, True])
def test_other_layouts_run_in_the_kernel_or_fall_back_to_eager_for_that_layer(backend, layout, mask, monkeypatch):
    device = DEVICE[backend]
    granularity, in_kernel = LAYOUTS[layout]
    shape = (6, 8) if layout == "transposed linear" else (8, 6, 3, 3)
    layers = [fake_layer(s, granularity, torch.float32, device) for s in [(8, 6, 3, 3), shape, (8, 6, 3, 3)]]
    w = layers[1].module.weight
    if layout == "transposed linear":
        w.data, w.grad = w.data.t().contiguous().t(), w.grad.t().contiguous().t()
    else:
        w.data = w.data.to(memory_format=torch.channels_last)
        if layout != "gradient not like the weight":
            w.grad = w.grad.to(memory_format=torch.channels_last)
    assert not w.is_contiguous()
    kept = [torch.rand(l.n_groups, device=device) < 0.5 for l in layers]
    if granularity == "weight":
        kept = [gf.masks.pack_bits(k) for k in kept]
    lam = torch.rand(3, device=device), torch.rand(3, device=device)
    ref = clone_layers(layers)
    assert ref[1].weight.stride() == w.stride()
    eager_layers = []
    real_step = eager.step

    def spy(batch, **kwargs):
        eager_layers.extend(l.name for l in batch.layers)
        return real_step(batch, **kwargs)
    monkeypatch.setattr(eager, "step", spy)
    module = {"cpp": cpp, "triton": triton_backend}[backend]
    got = module.step(StepBatch(layers, kept, *lam), want_scores=not mask, mask=mask)
    monkeypatch.setattr(eager, "step", real_step)
    assert eager_layers == ([] if in_kernel else [layers[1].name])
    want = eager.step(StepBatch(ref, kept, *lam), want_scores=not mask, mask=mask)
    for l, r in zip(layers, ref):
        torch.testing.assert_close(l.weight.grad, r.weight.grad)
        torch.testing.assert_close(l.weight.detach(), r.weight.detach())
        assert l.weight.stride() == r.weight.stride()
    for g, s in zip(got or [], want or []):
        torch.testing.assert_close(g, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [torch.float32, torch.bfloat16])
def test_mixed_dtypes_with_a_refused_layer_apply_the_penalty_exactly_once(backend, bad):
    device = DEVICE[backend]
    layers = [fake_layer((6, 8), "filter", dtype, device) for dtype in (torch.float32, torch.bfloat16) * 2]
    w = next(l for l in layers if l.weight.dtype == bad).module.weight
    w.data, w.grad = w.data.t().contiguous().t(), w.grad.t().contiguous().t()  # refused by the kernel
    kept = [torch.rand(6, device=device) < 0.5 for _ in layers]
    lam = torch.rand(4, device=device), torch.rand(4, device=device)
    ref = clone_layers(layers)
    module = {"cpp": cpp, "triton": triton_backend}[backend]
    module.step(StepBatch(layers, kept, *lam), want_scores=False, mask=False)
    eager.step(StepBatch(ref, kept, *lam), want_scores=False, mask=False)
    for l, r in zip(layers, ref):
        torch.testing.assert_close(l.weight.grad, r.weight.grad, **TOL[l.weight.dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_a_channels_last_model_matches_eager_through_every_phase(backend, fused, monkeypatch):
    want, _, _ = run("eager", "filter", "greg1", False)
    # every layer stays in the compiled call
    monkeypatch.setattr(eager, "step", lambda *a, **k: pytest.fail("a channels_last layer fell back to eager"))
    got, _, _ = run(backend, "filter", "greg1", fused, device=DEVICE[backend], channels_last=True)
    assert not got.conv2.weight.is_contiguous()
    for a, b in zip(want.parameters(), got.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_triton_rebuilds_its_launches_when_tensors_move_or_change_layout(fused):
    """The triton backend reuses a step's launches while the tensors stay put; moving the model to
    channels_last, replacing a weight, or gradients and momentum in another layout must rebuild
    them (a stale address table would write where the tensors no longer are)."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    device = DEVICE["triton"]
    batches = make_batches()
    nets = {}
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        net = SmallNet().to(device)
        plan = gf.plan(net, 0.5, example_inputs=torch.zeros(1, 3, 6, 6, device=device))
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        greg = gf.GrowingReg(opt, plan, backend=backend, fused=fused and backend == "triton", **SCHEDULE)
        data = [(x.to(device), y.to(device)) for x, y in batches]
        for i in range(10):
            if i == 3:
                net.to(memory_format=torch.channels_last)  # new addresses, new strides
            if i == 6:  # a new weight tensor for one layer, contiguous again, and its momentum with it
                net.conv2.weight.data = net.conv2.weight.data.contiguous()
                state = opt.state[net.conv2.weight]
                if "momentum_buffer" in state:
                    state["momentum_buffer"] = state["momentum_buffer"].contiguous()
            train_steps(net, greg, data, 1, start=i)
        nets[backend] = net
    for a, b in zip(nets["eager"].parameters(), nets["triton"].parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach().cpu(), rtol=1e-5, atol=1e-6)


class _CompiledStandIn:
    """What Triton gives greg_step.Direct (a CompiledKernel), running the interpreted kernel: its
    runner takes the whole signature positionally, constexprs included, as Triton 3.8's does."""

    def __init__(self, jit):
        self.jit = jit

    def __getitem__(self, grid):
        assert len(grid) == 3  # Triton's runner reads grid[0], grid[1] and grid[2]

        def runner(*args, stream=None):
            if self.jit.refuse:  # as a launcher built for another signature would
                raise TypeError(f"function takes exactly {len(args) - 1} arguments ({len(args)} given)")
            names = self.jit.kernel.arg_names
            assert len(args) == len(names)
            self.jit.counts["direct"] += 1
            self.jit.kernel[grid](**dict(zip(names, args)))
        return runner


class _JitStandIn:
    """greg_step's jitted kernel as on a GPU: a launch returns the compiled kernel."""

    def __init__(self, kernel):
        self.kernel, self.arg_names, self.counts = kernel, kernel.arg_names, {"full": 0, "direct": 0}
        self.refuse = False

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts["full"] += 1
            self.kernel[grid](*args, **kwargs)
            return _CompiledStandIn(self)
        return launch


@pytest.mark.parametrize("fused,capturable", [(False, False), (True, False), (True, True)])
def test_cached_launches_call_the_compiled_kernel_directly_and_match_eager(fused, capturable, monkeypatch):
    """On a GPU a cached launch calls the compiled kernel it got from its first launch, given the
    step's λ, hyper-parameters, scores and flags anew; a per-step tensor aligned otherwise than the
    one it was compiled for goes through Triton's full launch again."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    from greg_fast.kernels import greg_step
    jit = _JitStandIn(greg_step._greg_step_kernel)
    monkeypatch.setattr(greg_step, "_greg_step_kernel", jit)
    monkeypatch.setattr(greg_step, "DIRECT_OK", True)
    device = DEVICE["triton"]
    nets, phases = [], set()
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        net = SmallNet().to(device)
        plan = gf.plan(net, 0.5, example_inputs=torch.zeros(1, 3, 6, 6, device=device))
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        greg = gf.GrowingReg(opt, plan, method="greg2", backend=backend, fused=fused and backend == "triton",
                             capturable=capturable and backend == "triton", **SCHEDULE)
        for x, y in make_batches() * 5:
            x, y = x.to(device), y.to(device)
            phases.add(greg.phase)
            greg.zero_grad(set_to_none=False)  # gradients stay where they are, as on a GPU
            nn.functional.cross_entropy(net(x), y).backward()
            greg.step()
        nets.append(net)
    assert {"pick", "grow", "stabilize", "done"} <= phases
    assert jit.counts["direct"] > 3 * jit.counts["full"] > 0
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    layers = [fake_layer(s, "filter", torch.float32, device, sp) for s, sp in SHAPES["odd"]["filter"]]
    kept = [torch.ones(l.n_groups, dtype=torch.bool, device=device) for l in layers]
    memo, lam = {}, torch.full((len(layers) + 1,), 0.1, device=device)
    for lam_now in (lam[:-1], lam[:-1], lam[1:]):  # the last one 4 bytes into its storage
        full = jit.counts["full"]
        triton_backend.step(StepBatch(layers, kept, lam_now, lam_now, memo=memo), want_scores=False, mask=False)
    assert jit.counts["full"] == full + 1


def test_a_runner_that_refuses_the_arguments_is_left_for_the_full_launch(monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    from greg_fast.kernels import greg_step
    jit = _JitStandIn(greg_step._greg_step_kernel)
    jit.refuse = True
    monkeypatch.setattr(greg_step, "_greg_step_kernel", jit)
    monkeypatch.setattr(greg_step, "DIRECT_OK", True)
    device = DEVICE["triton"]
    layers = [fake_layer(s, "filter", torch.float32, device, sp) for s, sp in SHAPES["odd"]["filter"]]
    ref = clone_layers(layers)
    kept = [torch.rand(l.n_groups, device=device) < 0.6 for l in layers]
    lam, memo = torch.rand(len(layers), device=device), {}
    with pytest.warns(UserWarning, match="full launch from now on"):
        for _ in range(3):
            triton_backend.step(StepBatch(layers, kept, lam, lam * 2, memo=memo), want_scores=False, mask=False)
            eager.step(StepBatch(ref, kept, lam, lam * 2), want_scores=False, mask=False)
    assert not greg_step.DIRECT_OK and jit.counts == {"full": 3, "direct": 0}
    for l, r in zip(layers, ref):
        torch.testing.assert_close(l.weight.grad, r.weight.grad, **TOL[torch.float32])


@pytest.mark.parametrize("reader", ["C++", "Python"])
def test_launch_state_changes_exactly_when_what_a_launch_bakes_in_changes(reader, monkeypatch):
    """The check every cached triton launch passes each step: a moved, re-laid-out or replaced
    parameter, a new or missing gradient, a replaced mask must each change it; nothing else may."""
    if reader == "Python":
        monkeypatch.setattr(ops, "_C", None)
    elif ops._C is None:
        pytest.skip("the C++ extension is not built")
    conv = nn.Conv2d(3, 4, 3)
    conv.weight.grad = torch.randn_like(conv.weight)
    kept = [torch.ones(4, dtype=torch.bool), None]
    state = lambda: ops.launch_state([conv._parameters], ["weight"], kept)  # noqa: E731
    before = state()
    assert state() == before  # nothing changed
    conv.weight.grad.add_(1.0)  # in place: the same addresses
    conv.weight.data.mul_(2.0)
    assert state() == before
    changes = [
        lambda: setattr(conv.weight, "grad", conv.weight.grad.clone()),  # a new gradient
        lambda: setattr(conv.weight, "grad", None),
        lambda: setattr(conv.weight, "grad", torch.randn_like(conv.weight)),
        lambda: setattr(conv.weight, "data", conv.weight.data.clone()),  # the parameter moved
        lambda: setattr(conv.weight, "data", conv.weight.data.contiguous(memory_format=torch.channels_last)),
        lambda: setattr(conv.weight, "data", conv.weight.data.transpose(0, 1)),  # same address, new strides
        lambda: setattr(conv, "weight", nn.Parameter(conv.weight.detach().clone())),  # replaced
        lambda: kept.__setitem__(0, kept[0].clone()),  # a new mask
        lambda: setattr(conv.weight, "data", conv.weight.data.to(torch.float16)),  # another dtype
    ]
    for i, change in enumerate(changes):
        last = state()
        change()
        assert state() != last, i


def test_auto_env_and_forced_backends(monkeypatch):
    cpu = torch.device("cpu")
    assert dispatch.resolve("auto", cpu).name == "cpp"  # built at set-up
    monkeypatch.setenv(dispatch.ENV_VAR, "eager")
    assert dispatch.resolve("auto", cpu).name == "eager"
    assert dispatch.resolve("cpp", cpu).name == "cpp"  # explicit beats the environment
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not CUDA:
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu: it needs CUDA"):
            dispatch.resolve("triton", cpu)
    real_find_spec = ops.importlib.util.find_spec
    monkeypatch.setattr(ops.importlib.util, "find_spec",  # as after an isolated `pip install .`
                        lambda name, *a: None if name == "greg_fast._C" else real_find_spec(name, *a))
    monkeypatch.setattr(ops, "_IMPORT_ERROR", ops._load_extension())
    with pytest.raises(RuntimeError, match="C\\+\\+ extension was not built: reinstall with `pip install "
                                           "--no-build-isolation .`"):
        dispatch.resolve("cpp", cpu)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.resolve("auto", cpu).name == "eager"  # a missing build falls back quietly


def test_triton_is_unavailable_with_the_reason_when_its_kernels_do_not_import(monkeypatch):
    def broken():
        raise ImportError("No module named 'greg_fast.kernels'")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend, "_kernels", broken)
    triton_backend._kernels_error.cache_clear()
    try:
        reason = triton_backend.unavailable(torch.device("cpu"))
        assert "its kernels do not import (ImportError: No module named 'greg_fast.kernels')" in reason
        assert dispatch.auto_choice(torch.device("cpu")) == ("cpp" if "cpp" in BACKENDS else "eager")
    finally:
        triton_backend._kernels_error.cache_clear()


def test_fused_needs_plain_sgd():
    net = SmallNet()
    plan = gf.plan(net, 0.5, example_inputs=torch.zeros(1, 3, 6, 6))
    with pytest.raises(ValueError, match="needs a torch.optim.SGD"):
        gf.GrowingReg(torch.optim.Adam(net.parameters()), plan, fused=True)
    with pytest.raises(ValueError, match="without nesterov"):
        gf.GrowingReg(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True), plan, fused=True)


def test_cpp_ops_pass_opcheck():
    layer = fake_layer((7, 3, 3, 3), "filter", torch.float32, "cpu")
    kept = torch.rand(7) < 0.5
    lam = torch.rand(1), torch.rand(1)
    w, g = layer.weight.detach(), layer.weight.grad
    torch.library.opcheck(torch.ops.greg_fast.penalty_.default,
                          ([w], [g], [kept], *lam, list(layer.view), torch.tensor(False), torch.empty(7)))
    torch.library.opcheck(torch.ops.greg_fast.scores_.default, ([w], list(layer.view), torch.empty(7)))
    buf = torch.randn_like(w)
    torch.library.opcheck(torch.ops.greg_fast.fused_sgd_.default,
                          ([w], [g], [buf], [kept], *lam, torch.tensor([[0.1, 0.9, 1e-4]]), list(layer.view),
                           torch.tensor(True), torch.tensor(False), torch.empty(0)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [False, True])
def test_runs_of_columns_run_strided_in_the_kernel_after_the_rows_of_the_same_parameter(backend, dtype, mask, monkeypatch):
    """A coupled group penalizes a consumer's input columns in place (rows of A strided by the
    parameter's row length); its rows (another group) share entries with them, so rows go in a
    first pass and columns in a second, in one call, like eager's order."""
    device = DEVICE[backend]
    torch.manual_seed(0)
    slices, passes = row_and_column_slices(dtype, device)
    assert all(base.eligible(s) for s in slices)
    assert any(not s.weight.is_contiguous() for s in slices)
    kept = [torch.rand(s.n_groups, device=device) < 0.6 for s in slices]
    n = len(slices)
    lam = torch.rand(n, device=device), torch.rand(n, device=device)
    modules = list(dict.fromkeys(s.module for s in slices))
    ref_modules = [clone_module(m) for m in modules]
    ref_slices = [dataclasses.replace(s, module=ref_modules[modules.index(s.module)]) for s in slices]
    module = {"cpp": cpp, "triton": triton_backend}[backend]
    real_step = eager.step
    monkeypatch.setattr(eager, "step", lambda *a, **k: pytest.fail("a slice went through eager"))
    got = module.step(StepBatch(slices, kept, *lam, passes=passes), want_scores=not mask, mask=mask)
    monkeypatch.setattr(eager, "step", real_step)
    want = eager.step(StepBatch(ref_slices, kept, *lam, passes=passes), want_scores=not mask, mask=mask)
    for m, r in zip(modules, ref_modules):
        torch.testing.assert_close(m.weight.grad, r.weight.grad, **TOL[dtype])
        torch.testing.assert_close(m.weight.detach(), r.weight.detach(), **TOL[dtype])
    for g, s in zip(got or [], want or []):
        torch.testing.assert_close(g, s, **TOL[dtype])


def clone_module(m):
    c = nn.Module()
    c.weight = nn.Parameter(m.weight.detach().clone())
    c.weight.grad = m.weight.grad.clone()
    return c


def test_a_fused_step_refuses_slices_that_share_entries():
    layer = fake_layer((4, 3), "filter", torch.float32, "cpu")
    with pytest.raises(ValueError, match="updates every entry once"):
        StepBatch([layer, layer], [torch.ones(4, dtype=torch.bool)] * 2, torch.ones(2), torch.ones(2),
                  SGDArgs([None] * 2, [0.1] * 2, [0.0] * 2, [0.0] * 2), passes=(1, 1))


def test_passes_that_do_not_cover_the_layers_are_refused_before_anything_is_written():
    layers = [fake_layer((4, 3), "filter", torch.float32, "cpu") for _ in range(3)]
    before = [l.weight.grad.clone() for l in layers]
    with pytest.raises(RuntimeError, match="passes cover 2 layers, not 3"):
        ops.penalty_([l.weight for l in layers], [l.weight.grad for l in layers],
                     [torch.ones(4, dtype=torch.bool)] * 3, torch.ones(3), torch.ones(3), [l.view for l in layers],
                     mask=False, scores=torch.empty(0), passes=[1, 1])
    assert all(torch.equal(l.weight.grad, b) for l, b in zip(layers, before))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_the_cpp_step_compiles_with_fullgraph_and_equals_the_uncompiled_step(fused, mask):
    """torch.compile traces the cpp backend's whole step as one graph, the op inside it (torch
    derives the fake kernel of an op that only writes its ``(a!)`` arguments), and the result is
    the uncompiled call's, bit for bit: the first step of a capturable GrowingReg (issue 21)."""
    torch.manual_seed(0)
    shapes = [(8, 3, 3, 3), (16, 8, 1, 1), (10, 16)]
    runs = []  # the same start three times: uncompiled, compiled, and one for explain (which runs it)
    for _ in range(3):
        torch.manual_seed(0)
        layers = [fake_layer(s, "filter", torch.float32, "cpu") for s in shapes]
        kept = [torch.rand(l.n_groups) < 0.6 for l in layers]
        lam = torch.rand(len(layers)), torch.rand(len(layers))
        sgd = SGDArgs([torch.randn_like(l.weight) for l in layers], [0.1] * 3, [0.9] * 3, [1e-4] * 3) if fused else None
        runs.append((layers, StepBatch(layers, kept, *lam, sgd)))
    step = lambda batch: cpp.step(batch, want_scores=True, mask=mask)  # noqa: E731
    want = step(runs[0][1])
    torch._dynamo.reset()
    assert torch._dynamo.explain(step)(runs[2][1]).graph_break_count == 0
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(runs[1][1])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for la, lb in zip(runs[0][0], runs[1][0]):
        assert torch.equal(la.weight.grad, lb.weight.grad) and torch.equal(la.weight.detach(), lb.weight.detach())
