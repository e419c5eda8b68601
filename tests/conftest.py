import copy
import math
import os

import pytest
import torch
import torch.nn as nn

# Without a GPU the Triton kernels run in Triton's interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # models run on the GPU are compared with the CPU's float32: no TF32 convolutions or matmuls;
    # and two runs compared step by step need convolutions that sum in the same order each time
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False

# under pytest-xdist (-n auto: one worker per CPU) each worker takes its share of the CPUs, so
# that torch's thread pools do not oversubscribe the machine; a run compared with one in a subprocess
# needs the same count (float sums split over threads round differently)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # the processes a test starts compute as the test does

from greg_fast.plan import _group_view  # noqa: E402  (after TRITON_INTERPRET)
from greg_fast.units import LayerPlan, Slice  # noqa: E402


class SmallNet(nn.Module):
    """conv-bn-relu x2, pool, flatten, linear-relu, linear: every granularity has work here."""

    def __init__(self, c1=8, c2=13, hidden=11, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(c2 * 4, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_net():
    return SmallNet()


def make_batches(n=6, batch=8, classes=5, size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def train_steps(model, opt, batches, steps, start=0):
    """``steps`` training steps cycling through ``batches`` (from position ``start``)."""
    for i in range(start, start + steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def clone(model):
    return copy.deepcopy(model)


def fake_layer(shape, granularity, dtype, device, spatial=1, misaligned=False):
    """A LayerPlan over a fresh random weight of ``shape`` (conv if 4-d, linear if 2-d); with
    ``misaligned``, weight and gradient are views one element into flat buffers (as parameters and
    gradients in bucketed or flattened storage can be), so not 16-byte aligned."""
    module = nn.Conv2d(shape[1], shape[0], shape[2]) if len(shape) == 4 else nn.Linear(shape[1], shape[0])
    module = module.to(device=device, dtype=dtype)

    def fresh():
        if not misaligned:
            return torch.randn(shape, device=device).to(dtype)
        return torch.randn(math.prod(shape) + 1, device=device).to(dtype)[1:].view(shape)
    module.weight = nn.Parameter(fresh())
    module.weight.grad = fresh()
    view = _group_view(module, granularity, spatial)
    return LayerPlan(name=f"l{shape}", module=module, granularity=granularity, n_groups=view[1],
                     n_prune=view[1] // 2, ratio=0.5, view=view)


SHAPES = {  # (shape, spatial) per layout and granularity
    # primes, one-group layers, conv and linear, flatten-before-linear, rows longer than a program's share
    "odd": {
        "filter": [((7, 3, 3, 3), 1), ((1, 5, 3, 3), 1), ((13, 11), 1), ((64, 32, 1, 1), 1), ((3, 2300), 1)],
        "channel": [((7, 3, 3, 3), 1), ((5, 1, 3, 3), 1), ((13, 11), 1), ((6, 20), 4), ((17, 23, 5, 5), 1),
                    ((3, 600), 150)],
        "weight": [((7, 3, 3, 3), 1), ((1, 1), 1), ((13, 11), 1), ((5, 4097), 1)],
    },
    # every contiguous run (B; G for single weights) a multiple of 8: the triton backend's 128-bit path
    "aligned": {
        "filter": [((16, 8, 3, 3), 1), ((8, 32, 1, 1), 1), ((5, 40), 1), ((1, 16, 2, 2), 1), ((2, 4160), 1)],
        "channel": [((4, 3, 4, 4), 1), ((6, 64), 8), ((5, 96), 16)],
        "weight": [((8, 4, 3, 3), 1), ((16, 24), 1), ((1, 8), 1)],
    },
}


def slice_runs(module, runs):
    """Slices (greg_fast.units.Slice) of ``module.weight``: ``runs`` of (axis, start, n)."""
    w = module.weight
    inner = math.prod(w.shape[2:])
    out = []
    for axis, start, n in runs:
        view = (1, n, w[0].numel()) if axis == 0 else (w.shape[0], n, inner)
        out.append(Slice(f"{tuple(w.shape)}[{axis}:{start}+{n}]", module, "weight", axis, start, n,
                         torch.arange(n), view, "filter" if axis == 0 else "channel"))
    return out


RUNS = [((8, 12, 3, 3), [(0, 0, 3), (0, 5, 3), (1, 0, 4), (1, 7, 5)]),  # partial runs at odd starts
        ((6, 16), [(0, 1, 5), (1, 8, 8), (1, 1, 3)]),                   # linear, aligned and not
        ((16, 24, 1, 1), [(0, 0, 16), (1, 4, 16)]),                      # 1x1: B = 1
        ((4, 5, 3, 3), [(1, 0, 5)])]                                     # all columns: contiguous


def row_and_column_slices(dtype, device):
    """Slices of rows and of columns of the parameters in RUNS (a coupled group's view of them),
    rows first, and the passes that keep a parameter's rows and columns apart."""
    slices = [s for shape, runs in RUNS for s in slice_runs(fake_layer(shape, "filter", dtype, device).module, runs)]
    slices.sort(key=lambda s: s.axis)
    return slices, (sum(s.axis == 0 for s in slices), sum(s.axis == 1 for s in slices))
