"""Groups whose counts are tied: two channel groups that give the same stored width.

``nn.MultiheadAttention`` keeps one ``embed_dim`` for the residual stream it reads and writes and
for its q/k/v projections: the stream group and the attention group are different channels, but
after the cut they must leave the same width. Such groups are found from the plan's "width" members
(:mod:`greg_fast.groups.stored`): every group with a member on the same attribute of the same module
must keep the same number of its entries. A member holds ``k`` entries of the width per channel of
its group (a head of 64 dims: 64), and ``name//f`` widths set ``f`` times the kept entries, so a
group that loses ``n`` channels lowers the attribute by ``n * k * f``; tied groups lose channels in
the inverse proportion of ``k * f``. One group of each tied set, the root, carries the count (a
ratio, a budget's levels); the others follow it.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Mapping, Sequence

from .units import LayerPlan

Ties = dict[str, tuple[str, Fraction]]  # follower -> (root, follower's count / root's count)


def _attribute(module: str, spec: str) -> tuple[tuple[str, str], int]:
    """The attribute a width member sets (``name`` or ``name[i]``) and its factor (``name//f``: f)."""
    name, _, rest = spec.partition("[")
    name, _, factor = name.partition("//")
    return (module, name + ("[" + rest if rest else "")), int(factor or 1)


def find_ties(units: Sequence[LayerPlan]) -> tuple[Ties, dict[str, str]]:
    """The tied units of ``units`` (``{follower: (root, ratio of counts)}``, the root of a tied set
    its largest unit) and the units that no common count fits (``{name: reason}``: two paths
    through the ties ask for different proportions)."""
    per_attribute: dict[tuple[str, str], dict[str, int]] = {}
    for u in units:
        for key, positions in u.members.items():
            if key.role == "width":
                attribute, factor = _attribute(key.module, key.op)
                per_attribute.setdefault(attribute, {}).setdefault(u.name, positions.shape[1] * factor)
    edges: dict[str, list[tuple[str, Fraction, tuple[str, str]]]] = {}
    for attribute, weights in per_attribute.items():
        (a, wa), *rest = weights.items()
        for b, wb in rest:  # a loses n_a entries-weights wa, b loses n_b: n_a * wa == n_b * wb
            edges.setdefault(a, []).append((b, Fraction(wa, wb), attribute))
            edges.setdefault(b, []).append((a, Fraction(wb, wa), attribute))
    size = {u.name: u.n_groups for u in units}
    ties: Ties = {}
    conflicts: dict[str, str] = {}
    seen: set[str] = set()
    for start in [u.name for u in units if u.name in edges]:
        if start in seen:
            continue
        ratio, stack = {start: Fraction(1)}, [start]
        while stack:
            a = stack.pop()
            for b, r, attribute in edges[a]:
                if b not in ratio:
                    ratio[b] = ratio[a] * r
                    stack.append(b)
                elif ratio[b] != ratio[a] * r:
                    module, name = attribute
                    conflicts[start] = (f"it shares `{module}.{name}` with other groups, and the widths they tie "
                                        "together ask for different proportions of their cuts")
        seen |= set(ratio)
        if start in conflicts:
            conflicts.update({n: conflicts[start] for n in ratio})
            continue
        root = max(ratio, key=lambda n: (size[n], n == start))
        ties.update({n: (root, r / ratio[root]) for n, r in ratio.items() if n != root})
    return ties, conflicts


def followers(ties: Ties, root: str) -> dict[str, Fraction]:
    return {n: r for n, (rt, r) in ties.items() if rt == root}


def root_levels(ties: Ties, root: str, allowed: Mapping[str, Sequence[int]]) -> list[int]:
    """The counts of ``root`` among ``allowed[root]`` at which every unit tied to it loses a whole
    number of groups that its own ``allowed`` holds."""
    tied = followers(ties, root)
    if not tied:
        return allowed[root]
    sets = {n: set(allowed[n]) for n in tied}
    return [c for c in allowed[root]
            if all((c * r).denominator == 1 and int(c * r) in sets[n] for n, r in tied.items())]


def nearest(levels: Sequence[int], count: int) -> int:
    """The level closest to ``count`` (the lower one on a tie)."""
    return min(levels, key=lambda c: (abs(c - count), c))


def tied_counts(units: Sequence[LayerPlan], ties: Ties, wanted: Mapping[str, int], some: bool = False) -> dict[str, int]:
    """Counts for ``units``: ``wanted`` where untied, a root's nearest level (``some``: above 0 where
    one is) with its followers in proportion."""
    allowed = {u.name: range(u.n_groups) for u in units}
    out = {}
    for u in units:
        if u.name not in ties:
            levels = root_levels(ties, u.name, allowed)
            out[u.name] = nearest([c for c in levels if c] or levels if some else levels, wanted[u.name])
    return expand(ties, out)


def expand(ties: Ties, counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` with every follower of a root in it at the tied count (raises where a count given
    for a follower, or a root's count, breaks the tie)."""
    out = dict(counts)
    for n, (root, r) in ties.items():
        if root not in counts:
            continue
        c = counts[root] * r
        if c.denominator != 1 or (n in counts and counts[n] != c):
            raise ValueError(f"groups {root!r} and {n!r} give one stored width, so they lose channels in the "
                             f"proportion 1 : {r}; {counts[root]} and {counts.get(n, float(c))} do not keep it")
        out[n] = int(c)
    return out
