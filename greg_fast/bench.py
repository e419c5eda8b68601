"""Workloads and providers of the regularization-step benchmarks (bench/ and ``greg-fast bench``).

A workload is one model's regularized conv weights with random gradients under a 50% filter plan
(GReg-1, past its first λ update): of single layers as the reference plans them, or with the
``-coupled`` suffix of coupled channel groups (residual streams too; ``-coupled-group``: penalizing
every slice a group removes, consumers' columns and BatchNorm too); a provider is a callable doing
one step over them. Every record
states the bytes the step must move (see ``Workload.bytes_moved``), the effective GB/s and its
fraction of the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import models
from .backend import backends
from .engine import GrowingReg
from .plan import Plan, plan
from .table import format_table
from .timing import alternate, copy_bandwidth, device_name, device_slug, ratio_spread, time_call

MODELS = ("resnet56", "resnet50", "resnet152", "resnet50-coupled", "resnet50-coupled-group")
COUPLED, GROUP = "-coupled", "-group"
_LAYER_ONLY = ("reference", "foreach")  # written for the reference's per-layer λ
PENALTY_PROVIDERS = ("reference", "eager", "foreach", "compile", "cpp", "triton", "torch_pruning")
SGD_PROVIDERS = ("torch_sgd", "greg_fused_sgd")


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    plan: Plan
    device: torch.device
    numel: int = 0         # elements of the regularized weights
    penalized: int = 0     # elements of the groups whose λ is not 0 (GReg-1: the selected ones)
    copy_bw: float = 0.0   # bytes/s of a copy with the same footprint as weights + gradients
    penalize: str = "filters"

    @property
    def weights(self) -> list[torch.Tensor]:
        """The regularized parameters (a coupled group's slices are rows or columns of these)."""
        slices = [s for l in self.plan.pruned for s in l.slices(self.plan.module, self.penalize)]
        return list({id(s.param): s.param for s in slices}.values())

    def bytes_moved(self, provider: str) -> int:
        """What the step must move: the penalty reads w and grad and writes grad of the groups
        whose λ is not 0 (GReg-1 leaves kept groups at λ = 0); fused SGD reads w, grad and momentum
        and writes w and momentum of every weight."""
        if provider in SGD_PROVIDERS:
            return 5 * self.numel * self.weights[0].element_size()
        return 3 * self.penalized * self.weights[0].element_size()


def zoo_name(name: str) -> str:
    """The zoo model of a workload name (``resnet50-coupled-group`` -> ``resnet50``)."""
    return name.removesuffix(GROUP).removesuffix(COUPLED)


def workload(name: str, device: torch.device, dtype=torch.float32) -> Workload:
    torch.manual_seed(0)
    penalize = "group" if name.endswith(GROUP) else "filters"
    model = models.create(zoo_name(name)).to(device=device, dtype=dtype)
    size = model.greg_input_size
    example = torch.zeros(1, *size[:1], 64, 64, device=device, dtype=dtype) if size[1] > 64 else None
    p = plan(model, 0.5, example_inputs=example, coupled=COUPLED in name)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    numel = penalized = 0
    for unit in p.pruned:  # every channel of a unit has the same number of penalized entries
        entries = sum(s.weight.numel() for s in unit.slices(p.module, penalize))
        numel += entries
        penalized += unit.n_prune * entries // unit.n_groups
    return Workload(name, model, p, device, numel=numel, penalized=penalized,
                    copy_bw=copy_bandwidth(device, numel, dtype), penalize=penalize)


def _greg(work: Workload, backend: str, fused: bool = False, momentum: float = 0.9) -> GrowingReg:
    """A GrowingReg past its first λ update, so that timed calls are plain penalty steps."""
    params = work.weights
    opt = torch.optim.SGD(params, lr=0.0 if not fused else 1e-6, momentum=momentum, weight_decay=1e-4)
    # no NaN guard: torch's fused SGD has none either (the guard costs a read of every gradient)
    greg = GrowingReg(opt, work.plan, backend=backend, fused=fused, interval=10 ** 9, nan_guard=False,
                      penalize=work.penalize)
    grads = [p.grad.clone() for p in params]
    greg.step()  # iteration 0: the λ update
    for p, g in zip(params, grads):
        p.grad = g
    return greg


def reference_style(work: Workload) -> Callable[[], None]:
    """The reference implementation's step: a Python loop over layers, λ stored as [N, C] per
    layer, a full-size temporary ``λ * w`` and then an add into the gradient."""
    regs = []
    for layer in work.plan.pruned:
        w = layer.weight
        reg = torch.zeros(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
        reg[: layer.n_prune] = 1e-4
        regs.append(reg)
    modules = [l.module for l in work.plan.pruned]

    def step():
        for m, reg in zip(modules, regs):
            l2_grad = reg.unsqueeze(2).unsqueeze(3) * m.weight
            m.weight.grad += l2_grad
    return step


def foreach_style(work: Workload) -> Callable[[], None]:
    """``torch._foreach_*`` over all layers with per-group λ vectors broadcast over each filter."""
    greg = _greg(work, "eager")
    lam = [p.view(-1, 1, 1, 1).to(torch.float32) for p in greg.penalties().values()]
    weights = work.weights
    grads = [w.grad for w in weights]

    def step():
        torch._foreach_add_(grads, torch._foreach_mul(weights, lam))
    return step


def compiled_eager(work: Workload) -> Callable[[], None]:
    greg = _greg(work, "eager")
    compiled = torch.compile(greg.apply_penalty, dynamic=False)
    compiled()  # compile outside the timed calls
    return compiled


def torch_pruning_style(work: Workload) -> Callable[[], None]:
    """Torch-Pruning's GrowingRegPruner.regularize on the same model (all its prunable groups)."""
    import torch_pruning as tp
    model = work.model
    size = model.greg_input_size
    example = torch.zeros(1, size[0], 64, 64, device=work.device, dtype=work.weights[0].dtype)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.GrowingRegPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                        pruning_ratio=0.5, ignored_layers=[last])
    for param in model.parameters():
        if param.grad is None:
            param.grad = torch.randn_like(param) * 1e-3
    return lambda: pruner.regularize(model)


def provider(name: str, work: Workload) -> Callable[[], None]:
    if name == "reference":
        return reference_style(work)
    if name == "foreach":
        return foreach_style(work)
    if name == "compile":
        return compiled_eager(work)
    if name == "torch_pruning":
        return torch_pruning_style(work)
    if name == "torch_sgd":  # the plain fused SGD step over the same weights
        opt = torch.optim.SGD(work.weights, lr=1e-6, momentum=0.9, weight_decay=1e-4, fused=True)
        return opt.step
    if name == "greg_fused_sgd":
        return _greg(work, "auto", fused=True).step
    return _greg(work, name).apply_penalty


def unavailable(name: str, device: torch.device, work: Workload | None = None) -> str | None:
    """Why a provider cannot run here, or on ``work`` (None: it can)."""
    if name in ("eager", "cpp", "triton"):
        status = backends(device)[name]
        return None if status == "available" else status
    if name in _LAYER_ONLY and work is not None and COUPLED in work.name:
        return "written for single layers (the reference has no coupled groups)"
    if name in SGD_PROVIDERS + ("torch_pruning",) and work is not None and work.penalize == "group":
        return "a penalty-only workload (the fused step takes penalize='filters' only)"
    if name == "torch_pruning" and importlib.util.find_spec("torch_pruning") is None:
        return "Torch-Pruning is not installed (pip install greg-fast[bench])"
    if name == "greg_fused_sgd":
        return None if device.type == "cuda" or backends(device)["cpp"] == "available" else "no fused backend"
    return None


def record(work: Workload, name: str, seconds: float) -> dict:
    moved, copy_bw = work.bytes_moved(name), work.copy_bw
    return {"model": work.name, "provider": name, "seconds": seconds, "bytes": moved,
            "gb_per_s": moved / seconds / 1e9, "copy_fraction": moved / seconds / copy_bw,
            "copy_gb_per_s": copy_bw / 1e9, "device": device_name(work.device),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def run_set(device: torch.device, model_names=MODELS, providers=PENALTY_PROVIDERS + SGD_PROVIDERS,
            progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Every available provider on every workload; GPU-only providers are skipped on CPU."""
    records = []
    for model in model_names:
        work = workload(model, device)
        for name in providers:
            if unavailable(name, device, work) or (name == "triton" and device.type != "cuda"):
                continue
            progress(f"{model} {name}")
            records.append(record(work, name, time_call(provider(name, work), device)))
    return with_ratios(records)


# Whole training steps (forward, backward, step): the model, its batch and image size.
TRAIN_STEPS = {"resnet56": (64, 32), "resnet50": (8, 224)}
TRAIN_PROVIDERS = ("train_sgd", "train_greg", "train_greg_fused")


def training_step_records(name: str, device: torch.device, rounds: int = 15) -> list[dict]:
    """One training step of ``name`` with plain SGD, under GrowingReg, and under GrowingReg with
    ``fused=True`` (defaults otherwise: NaN guard on, λ updated every 10 steps), timed in
    alternation, one step of each per round, so that load on a shared machine hits all alike.
    Each record has the median step time and the median and 10th-90th percentile of its per-round
    ratio to plain SGD (``vs_train_sgd``; 1.0 = costs what a plain step does)."""
    import copy
    batch, size = TRAIN_STEPS[name]
    torch.manual_seed(0)
    base = models.create(name).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, [m for m in base.modules() if isinstance(m, torch.nn.Linear)][-1].out_features,
                      (batch,), device=device)
    def training_step(model, opt):
        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    steps = {}
    for provider in TRAIN_PROVIDERS:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        if provider != "train_sgd":
            opt = GrowingReg(opt, plan(model, 0.5, example_inputs=x[:1]), fused=provider == "train_greg_fused")
        steps[provider] = training_step(model, opt)
    times = alternate(steps, rounds, device)
    out = []
    for provider, t in times.items():
        median, spread = ratio_spread(t, times["train_sgd"])
        out.append({"kind": "train_step", "model": name, "provider": provider, "batch": batch, "image": size,
                    "seconds": statistics.median(t), "vs_train_sgd": median, "vs_train_sgd_p10_p90": spread,
                    "rounds": rounds, "device": device_name(device), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "date": datetime.date.today().isoformat()})
    return out


_BASELINES = {"penalty": ("reference", "eager"), "sgd": ("torch_sgd",), "compaction": ("compact_torch",),
              "train_step": ("train_sgd",)}  # other kinds (kernel time, host time) have none


KERNELS = " (kernels)"  # a record of GPU kernel time alone: ``provider + KERNELS``
HOST = " (host, no launch)"  # a record of our host code alone, the kernel launches stubbed out


def kind(provider: str) -> str:
    if provider.endswith(KERNELS):
        return "kernels"
    if provider.endswith(HOST):
        return "host"
    if provider in SGD_PROVIDERS:
        return "sgd"
    if provider in TRAIN_PROVIDERS:
        return "train_step"
    return "compaction" if provider.startswith("compact_") else "penalty"


def with_ratios(records: list[dict]) -> list[dict]:
    """Add each record's speed-up over its kind's baselines, same model, same run: the reference
    style and our eager path (penalty), torch's fused SGD (sgd), the PyTorch gather (compaction)."""
    base = {(r["model"], r["provider"]): r["seconds"] for r in records if "seconds" in r}
    for r in records:
        if "seconds" not in r:
            continue
        r["kind"] = kind(r["provider"])
        for ref in _BASELINES.get(r["kind"], ()):
            if (r["model"], ref) in base:
                r[f"x_{ref}"] = base[(r["model"], ref)] / r["seconds"]
    return records


def write_results(records: list[dict], directory: Path, device: torch.device) -> Path:
    """The day's results file for this device; a run over some models replaces those models'
    records of the kinds it measured and keeps the others (ratios stay within one model's run)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{device_slug(device)}-{datetime.date.today().isoformat()}.json"
    records = with_ratios(records)
    ran = {(r.get("model"), r.get("kind")) for r in records}
    kept = [r for r in json.loads(path.read_text()) if (r.get("model"), r.get("kind")) not in ran] \
        if path.exists() else []
    path.write_text(json.dumps(kept + records, indent=1))
    return path


def memory_records(name: str = "resnet50") -> list[dict]:
    """The engine's schedule state next to the reference's λ (a [N, C] tensor per layer for
    filter/channel, a full copy of the weight for unstructured), per granularity."""
    out = []
    for granularity in ("filter", "channel", "weight"):
        torch.manual_seed(0)
        model = models.create(name)
        p = plan(model, 0.5, granularity=granularity, example_inputs=torch.zeros(1, 3, 64, 64), coupled=False)
        greg = GrowingReg(torch.optim.SGD(model.parameters(), lr=0.0), p)
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        greg.step()  # past the first λ update: scores cached where they are kept
        weights = [l.weight for l in p.pruned]
        reference = sum((w.numel() if granularity == "weight" else w.shape[0] * w.shape[1]) * 4 for w in weights)
        out.append({"kind": "memory", "model": name, "granularity": granularity, "layers": len(weights),
                    "groups": sum(l.n_groups for l in p.pruned), "weights": sum(w.numel() for w in weights),
                    "engine_bytes": greg.state_bytes(), "reference_lambda_bytes": reference,
                    "bits_per_weight": 8 * greg.state_bytes() / sum(w.numel() for w in weights)})
    return out


def memory_table(records: list[dict]) -> str:
    rows = [("model", "granularity", "groups", "engine bytes", "reference λ bytes", "bits/weight")]
    rows += [(r["model"], r["granularity"], f"{r['groups']:,}", f"{r['engine_bytes']:,}",
              f"{r['reference_lambda_bytes']:,}", f"{r['bits_per_weight']:.3f}") for r in records]
    return format_table(rows, right=range(2, 6))


def table(records: list[dict]) -> str:
    def fmt(r, key, spec):
        return format(r[key], spec) if key in r else "-"
    # x baseline: fused SGD against torch's fused SGD, compaction against the PyTorch gather, a
    # training step against a plain SGD step
    rows = [("model", "provider", "ms", "GB/s", "of copy", "x reference", "x eager", "x baseline")]
    for r in records:
        if "seconds" not in r:
            continue
        baseline = r.get("x_torch_sgd", r.get("x_compact_torch", r.get("x_train_sgd")))
        rows.append((r["model"], r["provider"], f"{1e3 * r['seconds']:.3f}", fmt(r, "gb_per_s", ".1f"),
                     fmt(r, "copy_fraction", ".2f"), fmt(r, "x_reference", ".2f"), fmt(r, "x_eager", ".2f"),
                     "-" if baseline is None else f"{baseline:.2f}"))
    return format_table(rows, right=range(2, len(rows[0])))
