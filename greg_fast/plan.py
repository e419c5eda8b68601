"""Which layers are pruned, by how much, and what removing their groups costs and saves."""
from __future__ import annotations

import fnmatch
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .budget import ALLOCATIONS, DEFAULT_MAX_RATIO, check_round_to, check_timeable, parse_target, plan_to
from .capture import LAYER_TYPES, model_arguments, unwrap
from .compaction import compacted_copy, compaction_error
from .groups import LayerDeps, analyze_groups, analyze_layers
from .result import Plan
from .slices import plan_scores
from .ties import Ties, find_ties, root_levels, tied_counts
from .units import GRANULARITIES, HEADS, LayerPlan, MemberKey, n_prune_for

def _unread(name: str, modules: Mapping[str, nn.Module]) -> str:
    """Why a conv/linear that no op of the graph reads by its own name is not planned."""
    w = modules[name].weight
    twin = next((n for n, m in modules.items() if n != name and getattr(m, "weight", None) is w), None)
    if twin is not None:
        return f"its weight is the same parameter as `{twin}.weight` (tied weights)"
    return "it does not run on the example inputs (no op of the captured graph reads its weight)"



def _check_ratio(ratio: float, what: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"{what}: ratio must be a number in [0, 1), got {ratio!r}")
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{what}: ratio must be in [0, 1), got {ratio}")
    return ratio


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _layer_members(d: LayerDeps, granularity: str, n: int, deps: Mapping[str, LayerDeps],
                   modules: Mapping[str, nn.Module]) -> dict[MemberKey, torch.Tensor]:
    """The tensor axes an uncoupled layer's groups take with them. Filters: the weight's rows and
    bias, the BatchNorms after it, its consumers' columns; the rows, bias and norms are zeroed in the
    masked model. Channels: the weight's columns (zeroed) and the producer's rows, bias and norms."""
    rows = torch.arange(n).view(n, 1)
    filter_side = granularity == "filter"
    producer = d.name if filter_side else d.producer
    members = {MemberKey(producer, "weight", 0, "filter", filter_side): rows}
    if modules[producer].bias is not None:
        members[MemberKey(producer, "bias", 0, "bias", filter_side)] = rows
    for norm in deps[producer].norms:
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            if getattr(modules[norm], tensor, None) is not None:
                members[MemberKey(norm, tensor, 0, "norm", filter_side and tensor != "running_var")] = rows
    readers = [(c.name, c.spatial) for c in d.consumers] if filter_side else [(d.name, d.input_spatial)]
    for name, spatial in readers:
        members[MemberKey(name, "weight", 1, "input", not filter_side)] = torch.arange(n * spatial).view(n, spatial)
    return members


def _group_view(module: nn.Module, granularity: str, input_spatial: int) -> tuple[int, int, int]:
    w = module.weight
    if granularity == "filter":
        return (1, w.shape[0], w[0].numel())
    if granularity == "channel":
        channels = w.shape[1] // input_spatial
        return (w.shape[0], channels, w[0].numel() // channels)
    return (1, w.numel(), 1)


def _default_inputs(model: nn.Module) -> tuple:
    size = getattr(model, "greg_input_size", None)
    if size is None:
        first = next((m for m in model.modules() if isinstance(m, LAYER_TYPES)), None)
        if isinstance(first, nn.Linear):
            size = (first.in_features,)
        elif first is not None:
            size = (first.in_channels,) + (32,) * (first.weight.dim() - 2)
        else:
            raise ValueError("the model has no Conv or Linear layer to prune")
    p = next(model.parameters())
    return (torch.zeros(1, *size, device=p.device, dtype=p.dtype),)


class _FlopsByParameter(TorchDispatchMode):
    """Inside a FlopCounterMode: the FLOPs of every op that reads a weight, by that weight
    (``{(module, tensor): FLOPs}``; the op's count is what the counter adds while it runs)."""

    def __init__(self, model: nn.Module, counter: FlopCounterMode):
        super().__init__()
        self.counter, self.found = counter, {}
        self.owner = {}
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                module, _, tensor = name.rpartition(".")
                self.owner.setdefault(p.untyped_storage().data_ptr(), (module, tensor))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.counter.get_total_flops()
        out = func(*args, **(kwargs or {}))
        added = self.counter.get_total_flops() - before
        if added:
            for t in pytree.tree_leaves((args, kwargs)):
                at = self.owner.get(t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) else None
                if at is not None:
                    self.found[at] = self.found.get(at, 0) + added
                    break
        return out


def count_flops(model: nn.Module, example_inputs: tuple) -> tuple[dict[tuple[str, str], int], int]:
    """FLOPs of one eval-mode forward (``torch.utils.flop_counter``): of the ops that read each weight
    (``{(module, tensor): FLOPs}``, wherever the op runs: MultiheadAttention's ``out_proj.weight``
    is read by its parent's forward), and in all. MultiheadAttention's fused inference path is
    turned off meanwhile: the counter does not know its op."""
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, _FlopsByParameter(model, counter) as by:
            model(*example_inputs)
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return by.found, counter.get_total_flops()


API_NAMES = {"granularity": "granularity", "coupled": "coupled=True", "not_coupled": "coupled=False",
             "approximate": "approximate=True", "target": "a target", "allocation": "allocation",
             "max_ratio": "max_ratio", "round_to": "round_to", "ratio": "a ratio",
             "needs_target": "give target= too (e.g. target={'flops': '2x'})"}


def check_options(granularity: str, coupled: bool | None, approximate: bool, ratio, target, allocation,
                  max_ratio, round_to, names: Mapping[str, str] = API_NAMES):
    """The plan options checked together, the one place for these rules (the command line checks
    its flags with them before anything runs, naming its flags through ``names``). Returns
    ``(coupled, target, round_to)`` resolved."""
    n = names
    if granularity not in GRANULARITIES:
        raise ValueError(f"{n['granularity']} must be one of {GRANULARITIES}, got {granularity!r}")
    if coupled and granularity != "filter":
        raise ValueError(f"coupled groups are groups of filters: {n['granularity']} {granularity!r} plans single "
                         f"layers (pass {n['not_coupled']} or {n['granularity']} filter)")
    coupled = granularity == "filter" if coupled is None else bool(coupled)
    if approximate and not coupled:
        raise ValueError(f"{n['approximate']} cuts coupled groups (LayerNorm over channels); single-layer plans "
                         f"({n['not_coupled']}, channel or weight granularity) have none")
    if target is not None:
        if ratio is not None:
            raise ValueError(f"give {n['ratio']} or {n['target']}, not both: a target chooses the ratios (per-group "
                             "ratios that the target must not change go in ratios=)")
        target = parse_target(target)
        if target.kind == "latency" and granularity == "weight":
            raise ValueError("a latency target needs a structured plan: masks keep the dense kernels, so "
                             "unstructured pruning does not change the latency measured here")
    else:
        for name, value in (("allocation", allocation), ("max_ratio", max_ratio)):
            if value is not None:
                raise ValueError(f"{n[name]} spreads a target over the groups: {n['needs_target']}")
    if allocation is not None and allocation not in ALLOCATIONS:
        raise ValueError(f"{n['allocation']} must be one of {ALLOCATIONS}, got {allocation!r}")
    if max_ratio is not None and (isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float))
                                  or not 0 < max_ratio < 1):
        raise ValueError(f"{n['max_ratio']} must be in (0, 1): a number, the largest share of a group removed; "
                         f"got {max_ratio!r}")
    round_to = check_round_to(round_to, n["round_to"])
    if round_to is not None and granularity == "weight":
        raise ValueError(f"{n['round_to']} rounds channel counts; unstructured (weight) plans have none")
    return coupled, target, round_to


def plan(model: nn.Module, ratio: float | None = None, *, granularity: str = "filter",
         ratios: Mapping[str, float] | None = None, skip: Sequence[str] = (),
         example_inputs: tuple | torch.Tensor | None = None, coupled: bool | None = None,
         approximate: bool = False, target: Mapping | None = None, allocation: str | None = None,
         max_ratio: float | None = None, round_to: int | None = None, heads: str = "dims") -> Plan:
    """Decide which layers or channel groups of ``model`` are regularized and how many groups each loses.

    Prunability comes from the traced graph. With ``coupled`` (the default for filters) the units are
    channel groups (:mod:`greg_fast.groups`): all the filters, BatchNorm channels, depthwise filters,
    layer scales and consumer columns that residual adds, concats, gating and grouped convs tie to one
    channel go together, and one group loses ``n_prune`` channels. ``coupled=False`` plans single
    layers as the 2021 reference does: the groups of the same analysis that couple nothing (a layer
    whose channels a residual add, a concat, gating or a grouped conv ties to others is excluded);
    channel and weight granularity are always uncoupled.

    ``ratio`` applies to every unit; ``ratios`` maps module names or glob patterns to ratios that
    override it (the last matching key wins; a group is addressed by any module whose own channels it
    removes: producers, norms, depthwise convs, not the consumers reading it; two of them given
    different ratios raise); see :func:`stage_ratios` for the reference's ResNet stage lists. ``skip``
    excludes names or globs the same way. A unit prunes ``min(ceil(r * n_groups), n_groups - 1)``
    groups. A ``torch.compile``, DataParallel or DistributedDataParallel wrapper is planned through to
    the module it runs. Units whose weights are frozen (``requires_grad=False``) are excluded: they
    would lose groups without ever being regularized.

    Attention (``scaled_dot_product_attention`` or ``q @ k.T``, softmax, ``@ v``) is followed from
    the ops: ``heads="dims"`` (the default: the finest unit, and every head keeps its own attention
    pattern) cuts the same query/key or value dims in every head; ``heads="whole"`` removes whole
    heads (their q, k, v rows and the output projection's columns), and a ratio then counts heads.
    Widths a module stores (``num_heads``, ``head_dim``, split sizes) are updated by compaction;
    LayerNorm, GroupNorm, a mean over channels and attention's derived scale keep the masked model's
    count (:mod:`greg_fast.exact`), so the compacted model computes what the masked one did. Every
    such cut is confirmed by a trial compaction before the plan is returned.

    ``approximate=True`` keeps torch's own norms over the kept channels instead (the compacted model
    then computes a little differently) and also plans the groups whose cut changes what the model
    computes (a weight-standardized conv's inputs); ``LayerPlan.approximate`` says so, and
    :func:`greg_fast.compaction.output_change` measures the difference.

    ``target`` plans to a budget instead of a ratio (:mod:`greg_fast.budget`): ``{"flops": 0.5}``
    keeps at most half the FLOPs, ``{"params": "2x"}`` half the parameters, ``{"latency": "1.5x",
    "batch_size": 64}`` a measured speed-up on the model's device. ``allocation`` spreads it over the
    units: ``"uniform"`` (the default: one common ratio, found by search) or ``"global"`` (groups of
    all units ranked together by mean |w| relative to their unit's mean). No unit loses more than
    ``max_ratio`` of its groups (default 0.9, never all); units matched by ``ratios`` keep the ratio
    given and ``skip`` still excludes. ``round_to=N`` makes every unit keep a multiple of N groups or
    all of them (a unit of at most N groups stays whole); with a target the search accounts for it,
    with a ratio each count is rounded to the nearest allowed one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan() needs an nn.Module, got {type(model).__name__}")
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
    model = unwrap(model)
    coupled, target, round_to = check_options(granularity, coupled, approximate, ratio, target, allocation, max_ratio,
                                              round_to)
    ratio = _check_ratio(0.0 if ratio is None else ratio, "ratio")
    if ratios is not None and not isinstance(ratios, Mapping):
        raise TypeError(f"ratios must map layer names or globs to ratios, e.g. {{'layer1.*': 0.5}}; "
                        f"got {type(ratios).__name__}")
    ratios = {k: _check_ratio(v, f"ratios[{k!r}]") for k, v in (ratios or {}).items()}
    if isinstance(skip, str):
        skip = (skip,)
    if example_inputs is None:
        example_inputs = _default_inputs(model)
    example_inputs = model_arguments(example_inputs)

    modules = dict(model.named_modules())
    all_names = [n for n, m in modules.items() if isinstance(m, LAYER_TYPES)]
    for key in ratios:
        if not any(_matches(n, key) for n in (modules if coupled else all_names)):
            raise ValueError(f"ratios key {key!r} matches no {'module' if coupled else 'Conv/Linear layer'} "
                             f"of {type(model).__name__}")
    for pattern in skip:
        if not any(_matches(n, pattern) for n in modules):
            raise ValueError(f"skip entry {pattern!r} matches no module of {type(model).__name__}")

    if target is not None and target.kind == "latency":
        check_timeable(model, example_inputs, target.batch_size)
    layer_flops, total = count_flops(model, example_inputs)
    given: set[str] = set()  # units whose ratio comes from ratios=
    if coupled:
        layers, excluded = _coupled_units(model, example_inputs, ratio, ratios, skip, modules, approximate, heads,
                                          (layer_flops, total), given)
    else:
        layers, excluded = _layer_units(*analyze_layers(model, example_inputs), granularity, ratio, ratios, skip,
                                        modules, given)
    result = Plan(model, layers, excluded, layer_flops, total, example_inputs)
    if target is not None or round_to is not None:
        plan_to(result, target, allocation or "uniform", DEFAULT_MAX_RATIO if max_ratio is None else max_ratio,
                round_to, given, scorer=plan_scores, compactor=compacted_copy)
    return result


def _trial_masks(units: Sequence[LayerPlan], ties: Ties) -> dict[str, torch.Tensor]:
    """Masks that remove a different share of each unit (10-90%, spread over its channels): two widths
    that must agree but come from different groups then differ, as they may after training. Tied
    units (:mod:`greg_fast.ties`) lose the counts their tie asks for, their channels drawn apart."""
    g = torch.Generator().manual_seed(0)
    shares = {u.name: min(u.n_groups - 1, max(1, round(u.n_groups * (0.1 + (i * 0.618034) % 0.8))))
              for i, u in enumerate(units)}
    counts = tied_counts(units, ties, shares, some=True)
    masks = {}
    for u in units:
        keep = torch.ones(u.n_groups, dtype=torch.bool)
        keep[torch.randperm(u.n_groups, generator=g)[:counts[u.name]]] = False
        masks[u.name] = keep
    return masks


def _confirm(model, layers, excluded, pending, ties, layer_flops, total, example_inputs) -> list[LayerPlan]:
    """Keep the groups whose cut a trial compaction of a copy shows exact on the example inputs
    (approximate groups: that it runs); the others go to ``excluded`` with the reason ``pending`` gives
    (``{name: what the cut rests on}``: a width export wrote as a number, an op that keeps its
    original count, a stored width) or the trial's. The groups that rest on one op are tried
    together, since cutting any of them changes that op's width, and so are tied groups (``ties``);
    all at once first, then halves of the failing ones, down to the op or the group."""
    def error(units, precise=True):
        trial = Plan(model, units, {}, layer_flops, total)
        return compaction_error(model, _trial_masks(units, trial.ties), trial, example_inputs,
                                exact=not any(u.approximate for u in units), precise=precise)

    def failing(bundles) -> dict[str, str]:  # the search, in the model's own precision
        e = error([u for b in bundles for u in b], precise=False)
        if e is None:
            return {}
        if len(bundles) == 1:
            return {u.name: e for u in bundles[0]}
        half = len(bundles) // 2
        found = failing(bundles[:half]) | failing(bundles[half:])
        return found or {u.name: e for b in bundles for u in b}  # only together: all of them

    failed = {}
    root = {l.name: ties.get(l.name, (l.name,))[0] for l in layers}
    approximated = {l.name: bool(l.approximate) for l in layers}
    for approximate in (False, True):
        by_op: dict[str, list[LayerPlan]] = {}
        for l in layers:
            if l.n_groups > 1 and approximated[root[l.name]] == approximate:
                by_op.setdefault(pending.get(root[l.name], root[l.name]), []).append(l)
        bundles = list(by_op.values())
        if bundles and error([u for b in bundles for u in b]) is not None:
            failed.update(failing(bundles))
            rest = [u for b in bundles for u in b if u.name not in failed]
            if rest and (e := error(rest)) is not None:  # beyond float32's reach: float64 alone tells
                failed.update({u.name: e for u in rest})
    for name, e in failed.items():
        excluded[name] = f"{pending.get(name, 'its cut')} (a trial compaction on the example inputs: {e})"
    return [l for l in layers if l.name not in failed]


def _layer_units(deps, order, granularity, ratio, ratios, skip, modules, given):
    layers, excluded = [], {}
    for index, name in enumerate(order):
        d = deps[name]
        if any(_matches(name, p) for p in skip):
            excluded[name] = "skipped by the user"
            continue
        if granularity == "filter":
            reason = d.filter_reason
        elif granularity == "channel":
            reason = d.channel_reason
        else:
            reason = "first layer: the reference never prunes the stem" if index == 0 else None
        if reason is None and not d.module.weight.requires_grad:
            reason = "its weight is frozen (requires_grad=False): it would lose groups without being regularized"
        if reason is not None:
            excluded[name] = reason
            continue
        r = ratio
        for key, value in ratios.items():
            if _matches(name, key):
                r = value
                given.add(name)
        view = _group_view(d.module, granularity, d.input_spatial)
        layers.append(LayerPlan(
            name=name, module=d.module, granularity=granularity, n_groups=view[1],
            n_prune=n_prune_for(r, view[1]), ratio=r, view=view,
            norms=list(d.norms) if granularity == "filter" else [],
            consumers=[c.name for c in d.consumers] if granularity == "filter" else [],
            producer=d.producer if granularity == "channel" else None,
            members={} if granularity == "weight" else _layer_members(d, granularity, view[1], deps, modules)))
    for name, m in modules.items():
        if isinstance(m, LAYER_TYPES) and name not in deps:
            excluded[name] = _unread(name, modules)
    return layers, excluded


def _coupled_units(model, example_inputs, ratio, ratios, skip, modules, approximate, heads, flops, given_units):
    layers, excluded, pending = [], {}, {}
    groups, unfiltered = analyze_groups(model, example_inputs, heads)
    for g in groups:
        owners = list(dict.fromkeys(k.module for k in g.members if k.role != "input"))
        skipped = next((f"skipped by the user ({m!r} matches {p!r})" for m in owners for p in skip
                        if _matches(m, p)), None)
        filters = [k for k in g.members if k.role == "filter"]
        reason = skipped or g.reason
        members, approximated = g.members, g.approximate
        counted = [k for k in members if k.role == "count"]
        if counted and approximate:  # torch's own ops over the kept channels
            members = {k: v for k, v in members.items() if k.role != "count"}
            approximated = approximated or (f"`{counted[0].module}` computes {counted[0].op} over its channels: with "
                                            "approximate=True the compacted model computes it over the kept ones only")
        stored = [k for k in members if k.role == "width"]
        if reason is None and (g.speculative or counted or approximated or stored):
            pending[g.name] = g.speculative or approximated or (
                f"`{counted[0].module}` computes {counted[0].op} over the channels, which after the cut keeps the "
                "original count" if counted else f"`{stored[0].module}.{stored[0].op}` holds its width, which the cut updates")
        if reason is None and approximated and not approximate:
            reason = approximated + " (plan(..., approximate=True) cuts it anyway)"
        if reason is None and not all(getattr(modules[k.module], k.tensor).requires_grad for k in filters):
            reason = "a filter in it is frozen (requires_grad=False): it would lose channels without being regularized"
        if reason is not None:
            excluded[g.name] = reason
            continue
        given = {}
        for m in owners:
            for key, value in ratios.items():
                if _matches(m, key):
                    given[m] = value
        values = list(dict.fromkeys(given.values()))
        if len(values) > 1:
            m1, m2 = (next(m for m, r in given.items() if r == v) for v in values[:2])
            raise ValueError(f"group {g.name!r} couples {m1!r} and {m2!r}, which ratios give different values "
                             f"({values[0]} and {values[1]}); one group of channels has one ratio (per-layer "
                             "settings such as the reference's stage lists plan single layers: coupled=False)")
        r = next(iter(given.values())) if given else ratio
        if given:
            given_units.add(g.name)
        n = g.n_channels
        first = modules[filters[0].module]
        layers.append(LayerPlan(
            name=g.name, module=first, granularity="filter", n_groups=n, n_prune=n_prune_for(r, n), ratio=r,
            view=(1, n, 1), norms=list(dict.fromkeys(k.module for k in members if k.role == "norm")),
            consumers=list(dict.fromkeys(k.module for k in members if k.role == "input")),
            members=members, coupled=True, approximate=approximated, tensor=filters[0].tensor))
    layers, ties = _tie(layers, excluded, given_units)
    layers = _confirm(model, layers, excluded, pending, ties, *flops, example_inputs)
    # every conv/linear weight accounted for: a producer of an excluded group is excluded by name too
    planned = {k.module for l in layers for k in l.members}
    for g in groups:
        if g.name in excluded:
            for k in g.members:
                if k.role == "filter" and k.module not in planned:
                    excluded.setdefault(k.module, f"its filters are group {g.name!r}, excluded: {excluded[g.name]}"
                                        if k.module != g.name.split("#")[0] else excluded[g.name])
    for name, m in modules.items():
        if isinstance(m, LAYER_TYPES) and name not in planned and name not in excluded:
            excluded[name] = unfiltered.get(name) or _unread(name, modules)
    return layers, excluded


def _tie(layers: list[LayerPlan], excluded: dict[str, str], given: set[str]) -> tuple[list[LayerPlan], Ties]:
    """Give tied groups (one stored width: :mod:`greg_fast.ties`) counts in their tie's proportion, at
    the root's ratio (a ratio given to any of them: one set has one ratio); exclude those that no
    common count fits."""
    ties, conflicts = find_ties(layers)
    by_name = {l.name: l for l in layers}
    for root in dict.fromkeys(r for r, _ in ties.values()):
        tied = [root] + [n for n, (r, _) in ties.items() if r == root]
        ratios = {by_name[n].ratio for n in tied if n in given} or {by_name[root].ratio}
        if len(ratios) > 1:
            raise ValueError(f"groups {tied[0]!r} and {tied[1]!r} give one stored width, so they lose channels "
                             f"together, but ratios give them different values ({sorted(ratios)}); give them one")
        r = ratios.pop()
        levels = root_levels(ties, root, {n: range(by_name[n].n_groups) for n in tied})
        if len(levels) < 2:
            conflicts.update({n: "it gives a stored width with other groups, and no count above 0 leaves them "
                                 "equal widths" for n in tied})
            continue
        if given & set(tied):
            given.update(tied)
        counts = tied_counts([by_name[n] for n in tied], ties, {root: n_prune_for(r, by_name[root].n_groups)})
        for n in tied:
            by_name[n].n_prune, by_name[n].ratio = counts[n], r
    excluded.update(conflicts)
    kept = [l for l in layers if l.name not in conflicts]
    return kept, {n: t for n, t in ties.items() if n not in conflicts}


def stage_ratios(model: nn.Module, stages: Sequence[float]) -> dict[str, float]:
    """Turn the reference's ResNet stage list ``[stem, stage1, ..., stageK, fc]`` into ``ratios``.

    ``stage_ratios(resnet56, [0, 0.75, 0.75, 0.32, 0])`` gives
    ``{"conv1": 0, "layer1.*": 0.75, "layer2.*": 0.75, "layer3.*": 0.32, "fc": 0}``.
    """
    names = dict(model.named_children())
    n_stages = sum(1 for n in names if n.startswith("layer") and n[5:].isdigit())
    if n_stages == 0 or "conv1" not in names or "fc" not in names:
        raise ValueError(f"stage lists need a ResNet with conv1, layer1..layerK and fc; "
                         f"{type(model).__name__} has {list(names)}")
    if len(stages) != n_stages + 2:
        raise ValueError(f"{type(model).__name__} has {n_stages} stages: the list needs "
                         f"{n_stages + 2} ratios [stem, stage1..stage{n_stages}, fc], got {len(stages)}")
    keys = ["conv1", *(f"layer{i}.*" for i in range(1, n_stages + 1)), "fc"]
    return dict(zip(keys, map(float, stages)))
