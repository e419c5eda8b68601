"""One regularization step over a ResNet's regularized conv weights, per provider (see
greg_fast.bench). Records carry bytes moved, GB/s and the fraction of the copy bandwidth."""
import pytest

from greg_fast import bench


@pytest.mark.parametrize("name", bench.PENALTY_PROVIDERS + bench.SGD_PROVIDERS)
def test_step(benchmark, name, workload, device, records):
    reason = bench.unavailable(name, device, workload)
    if name == "triton" and device.type != "cuda":
        reason = "GPU only (the interpreter is for tests, not timings)"
    if reason:
        pytest.skip(reason)
    fn = bench.provider(name, workload)
    calls = bench.calls_per_round(fn, device)
    benchmark.pedantic(bench.repeated(fn, calls, device), rounds=20, warmup_rounds=3, iterations=1)
    rec = bench.record(workload, name, benchmark.stats.stats.median / calls)
    rec["calls_per_round"] = calls
    benchmark.extra_info.update(rec)
    records.append(rec)
