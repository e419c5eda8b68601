"""One regularization step over a ResNet's regularized conv weights, per provider (see
greg_fast.bench). Records carry bytes moved, GB/s and the fraction of the copy bandwidth."""
import pytest

from greg_fast import bench, timing


@pytest.mark.parametrize("name", bench.PENALTY_PROVIDERS + bench.SGD_PROVIDERS)
def test_step(benchmark, name, workload, device, records):
    reason = bench.unavailable(name, device, workload)
    if name == "triton" and device.type != "cuda":
        reason = "GPU only (the interpreter is for tests, not timings)"
    if reason:
        pytest.skip(reason)
    _time_step(benchmark, name, workload, device, records)


def _time_step(benchmark, name, workload, device, records, suffix=""):
    fn = bench.provider(name, workload)
    calls = timing.calls_per_round(fn, device)
    benchmark.pedantic(timing.repeated(fn, calls, device), rounds=20, warmup_rounds=3, iterations=1)
    rec = bench.record(workload, name, benchmark.stats.stats.median / calls)
    rec["provider"] += suffix
    rec["calls_per_round"] = calls
    benchmark.extra_info.update(rec)
    records.append(rec)


@pytest.mark.parametrize("name", ["triton", "greg_fused_sgd"])
def test_full_triton_launch(benchmark, name, workload, device, records, monkeypatch):
    """test_step's triton providers with Triton's full ``kernel[grid](...)`` launch every step
    instead of the cached compiled kernel called directly: the direct launch's same-run baseline."""
    if device.type != "cuda":
        pytest.skip("GPU only: the interpreter compiles nothing to call directly")
    reason = bench.unavailable(name, device, workload)
    if reason:
        pytest.skip(reason)
    from greg_fast.kernels import greg_step
    monkeypatch.setattr(greg_step, "DIRECT_OK", False)
    _time_step(benchmark, name, workload, device, records, suffix=", full Triton launch")


@pytest.mark.parametrize("name", ["eager", "triton", "torch_sgd", "greg_fused_sgd"])
def test_kernel_time(name, workload, device, records):
    """The same steps' GPU kernel time alone (torch.profiler): wall time far above it means the
    host, not the GPU, bounds the step."""
    if device.type != "cuda":
        pytest.skip("GPU only: kernel time is read from the GPU's profiler")
    reason = bench.unavailable(name, device, workload)
    if reason:
        pytest.skip(reason)
    rec = bench.record(workload, name, timing.kernel_seconds(bench.provider(name, workload), device))
    rec["provider"] += bench.KERNELS
    records.append(rec)


@pytest.mark.parametrize("state_reads", ["C++", "Python"])
def test_host_time(benchmark, state_reads, workload, device, records, monkeypatch):
    """The triton step's host code alone (λ and mask lists, the check that the cached launches
    still hold, the call), its kernel launches stubbed out: with the kernel time, what bounds the
    step. On the CPU it runs under TRITON_INTERPRET=1 (the stub means the interpreter never runs).
    ``Python``: the launches' state read tensor by tensor in Python (the fallback without the C++
    extension, and how every step read it before ops.launch_state): the same run's baseline."""
    reason = bench.unavailable("triton", device, workload)
    if reason:
        pytest.skip(reason)
    from greg_fast import ops
    from greg_fast.kernels import greg_step
    monkeypatch.setattr(greg_step, "launch", lambda *args, **kwargs: None)
    fn = bench.provider("triton", workload)
    if state_reads == "Python":
        monkeypatch.setattr(ops, "_C", None)
    calls = 200  # per round: a step's host code takes tens of µs, a round a few ms
    benchmark.pedantic(timing.repeated(fn, calls, device), rounds=30, warmup_rounds=3, iterations=1)
    rec = bench.record(workload, "triton", benchmark.stats.stats.median / calls)
    rec["provider"] += bench.HOST + ("" if state_reads == "C++" else ", state read in Python")
    benchmark.extra_info.update(rec)
    records.append(rec)
