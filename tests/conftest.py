import copy
import os

import pytest
import torch
import torch.nn as nn

# Without a GPU the Triton kernels run in Triton's interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
