"""pytest-benchmark harness: ``python -m pytest bench`` runs the CPU set (``--device cuda``: the GPU
set) and writes bench/results/<device>-<date>.json with every record of the run."""
import os
from pathlib import Path

import pytest
import torch

from greg_fast import bench

RESULTS = Path(__file__).parent / "results"


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="cpu or cuda")
    parser.addoption("--models", default=",".join(bench.MODELS), help="comma-separated models")


def pytest_configure(config):
    device = torch.device(config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device on this machine")
    if device.type == "cpu":  # the triton backend's host code on CPU tensors (its kernels are not timed here)
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_generate_tests(metafunc):
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", metafunc.config.getoption("--models").split(","))


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def records(device):
    collected = []
    yield collected
    if collected:
        path = bench.write_results(collected, RESULTS, device)
        print(f"\n{bench.table(collected)}\nwrote {path}")


_WORKLOADS = {}


@pytest.fixture
def workload(model, device):
    if (model, device) not in _WORKLOADS:
        _WORKLOADS.clear()  # one model's tensors at a time
        _WORKLOADS[(model, device)] = bench.workload(model, device)
    return _WORKLOADS[(model, device)]


def pytest_xdist_auto_num_workers(config):
    """The benchmarks time one thing at a time, in this process: pyproject's ``-n auto`` (pytest-xdist,
    for the tests) means no workers here (pytest-benchmark disables itself under xdist)."""
    return 0
