"""Timing primitives shared by the budget's latency search and the benchmarks: device sync, median
call times, calls taken in alternation so that load on a shared machine hits all of them alike,
ratio spreads, copy bandwidth and GPU kernel time. It imports nothing of greg_fast."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """:func:`device_name` as a file-name part (results files are named by device and date)."""
    return "".join(c if c.isalnum() else "-" for c in device_name(device)).strip("-").lower()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, numel: int, dtype=torch.float32) -> float:
    """Bytes per second of ``dst.copy_(src)``, counted STREAM-style as read + write of ``numel``
    elements (the write-allocate read a CPU also does is not counted, so a kernel that only writes
    what it has read can exceed 1.0 of it)."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / time_call(lambda: dst.copy_(src), device, rounds=10, warmup=2)


def calls_per_round(fn: Callable[[], None], device: torch.device, target_s: float = 2e-3) -> int:
    """How many back-to-back calls one timed round makes: 1 on the CPU; on a GPU enough to fill
    ~2 ms, so that the round's one host sync (tens of µs) does not count against kernels that
    themselves take tens of µs (ResNet-50's penalty step on an H100)."""
    if device.type != "cuda":
        return 1
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return max(1, min(1000, int(target_s / (time.perf_counter() - start))))


def repeated(fn: Callable[[], None], calls: int, device: torch.device) -> Callable[[], None]:
    """One timed round: ``calls`` calls of ``fn``, then a sync."""
    def round_():
        for _ in range(calls):
            fn()
        synchronize(device)
    return round_


def time_call(fn: Callable[[], None], device: torch.device, rounds: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` (for ``greg-fast bench``; bench/ uses pytest-benchmark)."""
    calls = calls_per_round(fn, device)
    round_ = repeated(fn, calls, device)
    times = []
    for i in range(warmup + rounds):
        synchronize(device)
        t = time.perf_counter()
        round_()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times) / calls


def alternate(calls: dict[str, Callable[[], None]], rounds: int, device: torch.device, warmup: int = 1
              ) -> dict[str, list[float]]:
    """Seconds of every call in every round, the calls taken in turn (one of each per round), so
    that load on a shared machine hits all of them alike; the first ``warmup`` rounds are dropped."""
    times = {name: [] for name in calls}
    for i in range(warmup + rounds):
        for name, fn in calls.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def ratio_spread(numerators: list[float], denominators: list[float]) -> tuple[float, list[float]]:
    """Median and [10th, 90th percentile] of the per-round ratios."""
    ratios = sorted(a / b for a, b in zip(numerators, denominators))
    return statistics.median(ratios), [ratios[len(ratios) // 10], ratios[-1 - len(ratios) // 10]]


def speedup(dense: Callable[[], None], pruned: Callable[[], None], device: torch.device, seconds: float = 1.0,
            rounds: int | None = None, warmup: int = 1) -> dict:
    """Two calls timed in alternation (one each per round, so that load on a shared machine hits
    both alike) for about ``seconds`` or for ``rounds`` rounds: median times and the median and
    10th-90th percentile of the per-round speed-up."""
    calls = {"dense": dense, "pruned": pruned}
    if rounds is None:
        synchronize(device)
        start = time.perf_counter()
        for fn in calls.values():  # warm-up, and the size of a round
            fn()
        synchronize(device)
        per_round = max(time.perf_counter() - start, 1e-6)
        rounds = max(5, min(200, int(seconds / per_round)))
    times = alternate(calls, rounds, device, warmup=warmup)
    median, spread = ratio_spread(times["dense"], times["pruned"])
    return {"dense_ms": 1e3 * statistics.median(times["dense"]), "pruned_ms": 1e3 * statistics.median(times["pruned"]),
            "speedup": median, "speedup_p10_p90": spread, "rounds": rounds}


def kernel_seconds(fn: Callable[[], None], device: torch.device, calls: int = 20) -> float:
    """GPU time per call of ``fn``: the durations of the kernels (and copies) it runs, read from
    torch.profiler, without the host's share. Set beside the wall time of the same provider it
    says whether a step is bound by the GPU or by the host launching it."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not gpu:
        raise RuntimeError("torch.profiler recorded no GPU activity")
    return sum(e.time_range.elapsed_us() for e in gpu) / calls / 1e6
