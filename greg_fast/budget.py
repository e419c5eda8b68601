"""Pruning to a budget: how many groups each unit loses so that the pruned model meets a FLOPs,
parameter or latency target.

Every unit can lose its groups in *steps*: from one allowed count of removed groups to the next
(one channel at a time, or with ``round_to=N`` so that the kept width stays a multiple of N). An
allocation is an order over all steps of all units; the plan takes the shortest prefix of that
order whose cost meets the target. Cost falls with every step, so the prefix is found by
bisection (for latency: on measured speed-ups). Two orders:

- ``uniform``: by the ratio a step leaves its unit at, so that every unit moves towards one common
  ratio (equal to it up to one step);
- ``global``: by the normalized score of the strongest group a step removes, all units together.
  The score of a group is its mean |w| divided by the mean over its unit's groups. Raw magnitudes
  are not comparable across layers: their scale follows the fan-in of the initialization, and a
  BatchNorm after a conv makes the conv's scale arbitrary (any factor is undone by the norm).
  Relative to its peers, a group's score says how weak it is within its layer, whatever the
  layer's scale; the cost of a step is left out of the order on purpose, so that which channels go
  follows importance and only where the prefix stops follows the budget.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .masks import keep_strongest
from .timing import speedup
from .ties import expand, nearest, root_levels
from .units import n_prune_for

TARGET_KINDS = ("flops", "params", "latency")
ALLOCATIONS = ("uniform", "global")
DEFAULT_MAX_RATIO = 0.9
NAMES = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}
TOLERANCE = 0.01  # a FLOPs or parameter target is met within 1% below it (never above)


@dataclass(frozen=True)
class Target:
    """A budget: keep at most ``keep`` of the dense model's ``kind`` (``keep = 1 / speed-up``);
    latency is measured at ``batch_size``."""
    kind: str
    keep: float
    batch_size: int = 64

    def __str__(self) -> str:
        what = f"latency at batch {self.batch_size}" if self.kind == "latency" else NAMES[self.kind]
        return f"{what} <= {self.keep:.4g} of dense ({1 / self.keep:.3g}x)"


def parse_keep(value, what: str) -> float:
    """A fraction kept (``0.5``, ``"0.5"``) or a speed-up (``"2x"``) -> the fraction kept, in (0, 1]."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a fraction kept such as 0.5 or a speed-up such as '2x', got {value!r}")
    text = str(value).strip().lower()
    try:
        if text.endswith("x"):
            speedup = float(text[:-1])
            if not (math.isfinite(speedup) and speedup >= 1):
                raise ValueError(f"{what}: a speed-up must be a finite number >= 1 (e.g. '2x'), got {value!r}")
            return 1.0 / speedup
        keep = float(text)
    except ValueError as err:
        if "speed-up must" in str(err):
            raise
        raise ValueError(f"{what}: expected a fraction kept such as 0.5 or a speed-up such as '2x', "
                         f"got {value!r}") from None
    if not (math.isfinite(keep) and 0 < keep <= 1):
        raise ValueError(f"{what}: the fraction of the dense model kept must be in (0, 1], got {value!r} "
                         "(a speed-up is written with an x: '2x')")
    return keep


def parse_target(target) -> Target:
    """``{"flops": 0.5}``, ``{"params": "2x"}``, ``{"latency": "1.5x", "batch_size": 64}`` -> Target."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, Mapping):
        raise TypeError("target must map one of flops, params, latency to a fraction kept or a speed-up, "
                        f"e.g. {{'flops': '2x'}}; got {type(target).__name__}")
    kinds = [k for k in target if k in TARGET_KINDS]
    unknown = [k for k in target if k not in TARGET_KINDS and k != "batch_size"]
    if unknown or len(kinds) != 1:
        raise ValueError(f"target needs exactly one of {', '.join(TARGET_KINDS)} (and for latency an optional "
                         f"batch_size), got keys {sorted(target)}")
    batch = target.get("batch_size", 64)
    if "batch_size" in target and kinds[0] != "latency":
        raise ValueError("target batch_size applies to a latency target only")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"target batch_size must be an integer >= 1, got {batch!r}")
    return Target(kinds[0], parse_keep(target[kinds[0]], f"target {kinds[0]}"), batch)


def target_from_args(args) -> dict | None:
    """The command line's ``--target-flops/--target-params/--target-latency`` as plan()'s target."""
    given = {k: v for k in TARGET_KINDS if (v := getattr(args, f"target_{k}", None)) is not None}
    if len(given) > 1:
        raise ValueError(f"give one target, not {' and '.join('--target-' + k for k in given)}")
    if not given:
        return None
    (kind, value), = given.items()
    return {kind: value, **({"batch_size": args.latency_batch_size} if kind == "latency" else {})}


def check_round_to(round_to, name: str = "round_to") -> int | None:
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"{name} must be an integer >= 1 (channels), got {round_to!r}")
    return round_to


def levels(n: int, cap: int, round_to: int | None) -> Sequence[int]:
    """The counts of removed groups a unit of ``n`` groups may take, ascending from 0: at most
    ``cap``, and with ``round_to`` only those that keep a multiple of it."""
    if not round_to or round_to == 1:
        return range(cap + 1)
    widths = range(round_to * ((n - 1) // round_to), 0, -round_to)  # multiples of round_to below n
    return [0] + [n - k for k in widths if n - k <= cap]


@dataclass
class Budget:
    """How a plan's counts were chosen, kept on the plan (``plan.budget``) so that a later selection
    (GrowingReg: GReg-1 and L1 at the start, GReg-2 at its pick) allocates again from its own scores
    with the same rules. ``flops_keep`` is the planned share of FLOPs kept; for a latency target it
    is what a re-allocation must reach (it cannot measure)."""
    target: Target
    allocation: str
    max_ratio: float
    round_to: int | None
    levels: dict[str, list[int]]      # allowed counts of every unit the budget allocates
    fixed: dict[str, int] = field(default_factory=dict)  # units whose count the user's ratios set
    flops_keep: float = 1.0
    achieved: dict = field(default_factory=dict)  # planned keep fractions; measured latency

    @property
    def by_score(self) -> bool:
        """Whether the counts depend on the weights (a later selection allocates again)."""
        return self.allocation == "global" and any(len(v) > 1 for v in self.levels.values())

    def describe(self) -> str:
        """One line for the plan's table: the target, the rules and what was reached."""
        rules = f"allocation {self.allocation}, max_ratio {self.max_ratio}" + (
            f", round_to {self.round_to}" if self.round_to else "")
        a = self.achieved
        reached = f"planned: FLOPs {a.get('flops_kept', 1):.4g}, parameters {a.get('params_kept', 1):.4g} kept"
        if "latency" in a:
            lat = a["latency"]
            reached += (f"; measured {lat['speedup']:.3g}x faster ({lat['speedup_p10_p90'][0]:.3g}-"
                        f"{lat['speedup_p10_p90'][1]:.3g} over {lat['rounds']} rounds)")
        return f"target: {self.target} ({rules}); {reached}"

    def restore(self, target: Target, achieved: dict, flops_keep: float) -> None:
        """Take back what a latency search found when the run started (a resumed run does not measure again)."""
        self.target, self.achieved, self.flops_keep = target, dict(achieved), flops_keep

    def units(self, plan) -> list:
        """The units this budget may cut (in plan order): those it allocates and those given a ratio."""
        cut = {n for n in self.levels if len(self.levels[n]) > 1} | {n for n, c in self.fixed.items() if c}
        return [u for u in plan.layers if u.name in cut or plan.ties.get(u.name, ("",))[0] in cut]

    def goal(self) -> tuple[str, float]:
        """What an allocation must keep at most: the target, or for latency the FLOPs of the
        allocation whose latency was measured (a re-allocation cannot measure)."""
        if self.target.kind == "latency" and "latency" in self.achieved:
            return "flops", self.flops_keep
        return self.target.kind, self.target.keep

    def check_counts(self, plan, counts: Mapping[str, int]) -> dict[str, int]:
        """``counts`` (a checkpoint's allocation: unit -> removed groups, the others none) checked
        against this budget's rules; returns them for every unit."""
        full = {u.name: 0 for u in plan.layers}
        for name, c in counts.items():
            if name not in full:
                raise ValueError(f"checkpoint allocates {name!r}, which is not a unit of this plan: it was saved "
                                 "for another model or plan")
            if name in plan.ties:  # follows its root: checked below
                continue
            allowed = self.levels.get(name)
            if (allowed is None and c != self.fixed.get(name, 0)) or (allowed is not None and c not in allowed):
                raise ValueError(f"checkpoint removes {c} groups of {name!r}, which this plan's budget does not "
                                 f"allow (max_ratio={self.max_ratio}, round_to={self.round_to}, ratios as given): "
                                 "it was saved for a plan with other settings")
            full[name] = c
        full.update(self.fixed)
        try:
            full = expand(plan.ties, {n: c for n, c in full.items() if n not in plan.ties})
        except ValueError as err:
            raise ValueError(f"checkpoint's allocation does not fit this plan: {err}") from None
        bad = next((n for n in plan.ties if n in counts and counts[n] != full[n]), None)
        if bad is not None:
            raise ValueError(f"checkpoint removes {counts[bad]} groups of {bad!r}, but its tie to "
                             f"{plan.ties[bad][0]!r} (one stored width) asks for {full[bad]}: it was saved for "
                             "another plan")
        kind, keep = self.goal()
        got = plan.kept_fraction(full)[kind]
        if got > keep * (1 + 1e-9):
            raise ValueError(f"checkpoint's allocation keeps {got:.4g} of the {NAMES[kind]}, more than this plan's target "
                             f"({keep:.4g}): it was saved for a plan with another target")
        return full

    def order(self, units: Sequence, scores: Mapping[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every step of every allocated unit, in the allocation's order: (unit index, level index
        reached) per step."""
        keys, unit_of, level_of = [], [], []
        for i, u in enumerate(units):
            allowed = self.levels[u.name]
            if len(allowed) < 2:
                continue
            reached = (torch.arange(1, len(allowed)) if isinstance(allowed, range)
                       else torch.tensor(allowed[1:])).double()
            if self.allocation == "uniform":
                key = reached / u.n_groups
            else:
                s = scores[u.name].detach().double().cpu()
                z = torch.sort(s / s.mean().clamp_min(torch.finfo(torch.float64).tiny)).values
                key = z[reached.long() - 1]  # the strongest group the step removes
            keys.append(key)
            unit_of.append(torch.full((len(reached),), i, dtype=torch.int64))
            level_of.append(torch.arange(1, len(allowed)))
        if not keys:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        key, unit, level = torch.cat(keys), torch.cat(unit_of), torch.cat(level_of)
        # stable: ties by unit order, and a unit's own steps stay in their order (keys ascend within it)
        order = torch.argsort(key, stable=True)
        return unit[order], level[order]

    def counts(self, units: Sequence, steps: tuple[torch.Tensor, torch.Tensor], k: int) -> dict[str, int]:
        """Removed groups per unit after the first ``k`` steps (fixed units at their given count)."""
        unit, level = steps
        reached = torch.zeros(len(units), dtype=torch.int64)
        if k:
            reached.scatter_reduce_(0, unit[:k], level[:k], "amax")
        out = dict(self.fixed)
        for i, u in enumerate(units):
            if u.name in self.levels:
                out[u.name] = self.levels[u.name][int(reached[i])]
        return out


Scorer = Callable[[object, Sequence], dict]  # (plan, units) -> each unit's group scores
Compactor = Callable[[object, Mapping[str, torch.Tensor]], nn.Module]  # (plan, masks) -> a compacted copy


def plan_to(plan, target: Target | None, allocation: str, max_ratio: float, round_to: int | None,
            given: set[str], *, scorer: Scorer, compactor: Compactor) -> None:
    """Apply a target (and rounding) to a freshly built ``plan``: units in ``given`` keep the count
    their ratio gave (rounded), the others are allocated. ``scorer`` gives group scores (a global
    allocation, a latency probe's selection) and ``compactor`` a compacted copy to time: handed in by
    the caller, which sits above both."""
    units = plan.layers
    if round_to:
        if units and all(u.n_groups <= round_to for u in units):
            largest = max(units, key=lambda u: u.n_groups)
            raise ValueError(f"round_to={round_to} is larger than every group that can be cut (the largest, "
                             f"{largest.name!r}, has {largest.n_groups} channels): nothing could be pruned; "
                             "use a smaller round_to")
        small = next((u for u in units if u.name in given and u.n_prune and u.n_groups <= round_to), None)
        if small is not None:
            raise ValueError(f"ratios prune {small.name!r} ({small.n_groups} channels), which round_to={round_to} "
                             "keeps whole (it cannot keep a multiple of it): lower round_to or drop that ratio")
    def allowed(cap) -> dict[str, Sequence[int]]:  # a root of tied units: the levels its followers allow too
        own = {u.name: levels(u.n_groups, cap(u), round_to) for u in units}
        return {n: root_levels(plan.ties, n, own) for n in own if n not in plan.ties}

    whole = allowed(lambda u: u.n_groups - 1)
    fixed = {u.name: nearest(whole[u.name], u.n_prune) for u in units
             if u.name in whole and (target is None or u.name in given)}
    plan.set_counts({n: fixed.get(n, 0) for n in whole})
    if target is None:
        return
    capped = allowed(lambda u: n_prune_for(max_ratio, u.n_groups))
    plan.budget = Budget(target, allocation, max_ratio, round_to, fixed=fixed,
                         levels={n: v for n, v in capped.items() if n not in given})
    allocate(plan, scorer=scorer, compactor=compactor)


def _fill(steps, cost, keep):
    """The shortest prefix of ``steps`` with ``cost <= keep``; where its last step lands more than
    the tolerance below ``keep``, that step's unit stays where it was (its later steps are passed
    over) and the search goes on with the steps after it, so that small steps further down the
    order fill the budget. Returns the (filtered) steps and the prefix length (None: unreachable)."""
    meets = lambda st, k: cost(st, k) <= keep * (1 + 1e-12)
    k = shortest_prefix(len(steps[0]), lambda k: meets(steps, k))
    while k is not None and k > 0 and cost(steps, k) < keep * (1 - TOLERANCE):
        unit, level = steps
        rest = torch.arange(len(unit)) >= k
        later = rest & (unit == unit[k - 1])  # the overshooting unit's step and those after it
        later[k - 1] = True
        if not rest.any():
            break
        shorter = (unit[~later], level[~later])
        k2 = shortest_prefix(len(shorter[0]), lambda j: meets(shorter, j))
        if k2 is None:  # without that step nothing meets the budget: keep it
            break
        steps, k = shorter, k2
    return steps, k


def shortest_prefix(n_steps: int, meets) -> int | None:
    """The smallest k in [0, n_steps] with ``meets(k)`` (monotone), or None when even all steps fail."""
    if not meets(n_steps):
        return None
    lo, hi = -1, n_steps  # meets(hi) holds; meets(lo) does not (or lo = -1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def allocate(plan, scores: Mapping[str, torch.Tensor] | None = None, *, scorer: Scorer | None = None,
             compactor: Compactor | None = None) -> dict[str, int]:
    """The counts that meet ``plan.budget`` with the fewest steps of its order, set on ``plan``.
    FLOPs and parameter targets are planned; a latency target is measured (:func:`_latency_prefix`)
    once, and a re-allocation from later ``scores`` (global) meets its ``flops_keep``. Without
    ``scores``, a global allocation and a latency search take them from ``scorer``."""
    budget = plan.budget
    units = [u for u in plan.layers if u.name in budget.levels]
    if scores is None and (budget.allocation == "global" or budget.goal()[0] == "latency"):
        scores = scorer(plan, units)
    steps = budget.order(units, scores)
    n = len(steps[0])
    kind, keep = budget.goal()

    def kept_by(st, k):
        return plan.kept_fraction(budget.counts(units, st, k))

    def kept(k):
        return kept_by(steps, k)

    if kind == "latency":
        k = _latency_prefix(plan, units, steps, scores, compactor)
    else:
        steps, k = _fill(steps, lambda st, k: kept_by(st, k)[kind], keep)
        if k is None:
            floor = kept(n)[kind]
            raise ValueError(f"target {budget.target} cannot be reached: with every allocated group at its cap "
                             f"(max_ratio={budget.max_ratio}{f', round_to={budget.round_to}' if budget.round_to else ''}"
                             f"{', ratios as given' if budget.fixed else ''}, excluded groups whole) the model "
                             f"keeps {floor:.4g} of its {NAMES[kind]} ({1 / floor:.3g}x): the reachable range is "
                             f"[{floor:.4g}, 1] kept (1x-{1 / floor:.3g}x)")
    counts = budget.counts(units, steps, k)
    plan.set_counts(counts)
    fractions = plan.kept_fraction(counts)
    if kind == budget.target.kind:  # not a latency budget's re-allocation, which keeps the measured one's FLOPs
        budget.flops_keep = fractions["flops"]
    budget.achieved.update({f"{key}_kept": v for key, v in fractions.items()})
    return counts


def selection(units: Sequence, counts: Mapping[str, int], scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks that remove each unit's ``counts`` lowest-score groups (the L1 selection)."""
    return {u.name: keep_strongest(scores[u.name].cpu(), counts.get(u.name, 0)) for u in units}


# ---- latency ----
def batch_inputs(example_inputs: tuple, batch_size: int) -> tuple:
    """The example inputs at ``batch_size``: their first sample repeated."""
    nested = [type(x).__name__ for x in example_inputs if isinstance(x, (list, tuple, dict))]
    if nested:
        raise ValueError(f"latency is timed at a batch size by repeating each input tensor's first sample; "
                         f"these example_inputs hold a {nested[0]}, which cannot be batched that way: use a "
                         "FLOPs or params target")
    return tuple(x[:1].expand(batch_size, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) and x.dim()
                 else x for x in example_inputs)


def check_timeable(model: nn.Module, example_inputs: tuple, batch_size: int) -> None:
    """Raise naming why ``model`` cannot be timed at ``batch_size`` (before any search)."""
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "meta":
        raise ValueError("a latency target needs a model with real weights: this one is on the meta device "
                         "(nothing runs there); use a FLOPs target or move it to a device")
    inputs = batch_inputs(example_inputs, batch_size)
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except Exception as err:
        raise ValueError(f"a latency target needs the model to run on its example inputs at batch {batch_size}, "
                         f"and it does not: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
                         "use a FLOPs target or give example_inputs it runs on") from err


def measure_speedup(dense: nn.Module, pruned: nn.Module, inputs: tuple, seconds: float = 1.0,
                    rounds: int | None = None, warmup: int = 1) -> dict:
    """Dense and pruned timed in alternation (:func:`greg_fast.timing.speedup`), without autograd."""
    device = next(dense.parameters()).device
    with torch.no_grad():
        return speedup(lambda: dense(*inputs), lambda: pruned(*inputs), device, seconds, rounds, warmup)


def _latency_prefix(plan, units, steps, scores, compactor: Compactor, seconds: float = 1.0) -> int:
    """The shortest prefix whose compacted model is measured at least the target's speed-up
    faster than the dense one (bisection on measurements; each probe compacts a copy)."""
    budget = plan.budget
    goal = 1 / budget.target.keep
    inputs = batch_inputs(plan.example_inputs, budget.target.batch_size)
    dense = copy.deepcopy(plan.module("")).eval()
    probes = {}

    def measured(k):
        if k not in probes:
            masks = selection(units, budget.counts(units, steps, k), scores)
            probes[k] = measure_speedup(dense, compactor(plan, masks).eval(), inputs, seconds)
        return probes[k]

    n = len(steps[0])
    k = shortest_prefix(n, lambda k: measured(k)["speedup"] >= goal)  # the median of alternating rounds
    if k is None:
        best = measured(n)
        raise ValueError(f"target {budget.target} cannot be reached: with every allocated group at its cap "
                         f"(max_ratio={budget.max_ratio}) the compacted model is measured "
                         f"{best['speedup']:.3g}x faster ({best['speedup_p10_p90'][0]:.3g}-"
                         f"{best['speedup_p10_p90'][1]:.3g} over rounds): the reachable range is 1x-"
                         f"{best['speedup_p10_p90'][1]:.3g}x")
    final = measured(k)
    budget.achieved["latency"] = {**final, "batch_size": budget.target.batch_size, "probes": len(probes)}
    return k
