"""The op table: what each ATen op does to channels, one rule per op family.

Rules are free functions in the family files (``layers``, ``norms``, ``arithmetic``, ``shapes``,
``reductions``), registered with :func:`register` under ATen op names. Each name is resolved to its
``torch.ops.aten`` op when the family file is imported, so a typo fails at import, and a name
registered twice is refused there too. A rule is called as ``rule(walk, node, args)`` (``args``: the
op's arguments by schema name), or with ``x=`` as ``rule(walk, node, args, x)``: the walk then reads
that argument first and, when it is not a tensor the walk follows (or, with ``activation=True``, when
it is computed from parameters alone), freezes what the op reads instead of calling the rule: the
one place that check is written. An op in no entry may still be claimed by a predicate rule
(:func:`register_fallback`: ops that act on each entry alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx


@dataclass(frozen=True)
class Rule:
    fn: Callable
    x: str | int | None = None   # the argument the rule acts on (a schema name or a position)
    activation: bool = False     # it must be an activation, not a value computed from parameters


RULES: dict[str, Rule] = {}  # ATen op name (overload packet) -> rule
FALLBACKS: list[tuple[Callable[[fx.Node], bool], Rule]] = []


def resolve(*names: str) -> frozenset[str]:
    """The names, each checked to be an ATen op (AttributeError at import otherwise)."""
    for name in names:
        if not isinstance(getattr(torch.ops.aten, name, None), torch._ops.OpOverloadPacket):
            raise AttributeError(f"greg_fast.groups: {name!r} is not an ATen op (torch.ops.aten.{name})")
    return frozenset(names)


def register(*names: str, x: str | int | None = None, activation: bool = False):
    """Register the function as what the ATen ops ``names`` do to channels."""
    def add(fn):
        for name in resolve(*names):
            if name in RULES:
                raise ValueError(f"aten.{name} has two rules: {RULES[name].fn.__qualname__} and {fn.__qualname__}")
            RULES[name] = Rule(fn, x, activation)
        return fn
    return add


def register_fallback(applies: Callable[[fx.Node], bool], *, x: str | int | None = None,
                      activation: bool = False):
    """Register the function for ops in no entry for which ``applies(node)`` holds."""
    def add(fn):
        FALLBACKS.append((applies, Rule(fn, x, activation)))
        return fn
    return add


def rule_for(name: str | None, node: fx.Node) -> Rule | None:
    found = RULES.get(name) if name is not None else None
    if found is not None or name is None:
        return found
    return next((r for applies, r in FALLBACKS if applies(node)), None)


# ops the walk treats by kind rather than by a rule
METADATA = resolve("sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "stride", "dim", "numel",
                   "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size")
SHAPE_OF = resolve("reshape_as", "view_as", "expand_as", "type_as")  # the second argument gives only its shape
IDENTITY = resolve("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "_to_copy", "to", "type_as",
                   "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "_assert_async")
MOVEMENT = resolve("view", "_unsafe_view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
                   "unsqueeze", "expand", "movedim", "reshape_as", "view_as", "expand_as", "slice", "select",
                   "narrow") | IDENTITY
