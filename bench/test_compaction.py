"""Physical compaction of ResNet-50 / ResNet-152 at ratio 0.5 (random masks): our C++ gather, the
pure-PyTorch gather, and Torch-Pruning's dependency-graph pruner on the same model and masks
(on a GPU: the PyTorch gather and Torch-Pruning; the C++ gather is for CPU tensors)."""
import copy
import datetime
import importlib.util

import pytest
import torch

import greg_fast as gf
from greg_fast import bench, models, timing

X = torch.zeros(1, 3, 64, 64)
_BASE = {}


def base(model, device):
    if (model, device) not in _BASE:
        _BASE.clear()
        m = models.create(model).eval().to(device)
        p = gf.plan(m, 0.5, example_inputs=X.to(device))
        g = torch.Generator().manual_seed(0)
        masks = {l.name: torch.randperm(l.n_groups, generator=g) >= l.n_prune for l in p.layers}
        _BASE[(model, device)] = (m, masks)
    return _BASE[(model, device)]


@pytest.mark.parametrize("model_name", ["resnet50", "resnet152"])
@pytest.mark.parametrize("provider", ["cpp", "torch", "torch_pruning"])
def test_compaction(benchmark, model_name, provider, device, records):
    if provider == "cpp" and device.type != "cpu":
        pytest.skip("the C++ gather takes CPU tensors")
    if provider == "torch_pruning" and importlib.util.find_spec("torch_pruning") is None:
        pytest.skip("Torch-Pruning is not installed (pip install greg-fast[bench])")
    model, masks = base(model_name, device)
    x = X.to(device)

    def fresh():  # untimed: a copy of the model and its plan (or dependency graph)
        m = copy.deepcopy(model)
        if provider != "torch_pruning":
            return (m, gf.plan(m, 0.5, example_inputs=x)), {}
        import torch_pruning as tp
        return (m, tp.DependencyGraph().build_dependency(m, example_inputs=x)), {}

    def ours(m, p):
        gf.compact(m, masks, p, backend=provider)

    def theirs(m, dg):
        import torch_pruning as tp
        for name, kept in masks.items():
            removed = (~kept).nonzero().flatten().tolist()
            if removed:
                dg.get_pruning_group(m.get_submodule(name), tp.prune_conv_out_channels, idxs=removed).prune()

    def timed(m, p):
        (theirs if provider == "torch_pruning" else ours)(m, p)
        timing.synchronize(device)

    benchmark.pedantic(timed, setup=fresh, rounds=5, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    rec = {"model": model_name, "provider": f"compact_{provider}", "seconds": seconds,
           "device": timing.device_name(device), "date": datetime.date.today().isoformat()}
    benchmark.extra_info.update(rec)
    records.append(rec)
