"""The walk over an exported graph: every node's :class:`~greg_fast.groups.values.Val` from its
inputs' through the op table (:mod:`greg_fast.groups.registry`), and the groups that come out."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import describe, emitter, export, module_path
from ..units import MemberKey
from .registry import METADATA, MOVEMENT, SHAPE_OF, Rule, rule_for
from .stored import width_source
from .values import NONE, Val, bind, line, meta_shape, move, op_name, unique_pairs, varies, writes_first_argument


@dataclass
class Group:
    """A coupled channel group as found in the graph: ``members`` maps each tensor axis it touches to
    the positions of its channels there, int64 ``[n_channels, k]`` (k entries per channel)."""
    name: str
    members: dict[MemberKey, torch.Tensor]
    reason: str | None  # why it cannot be removed, or None
    approximate: str | None = None  # why its cut changes what the model computes
    speculative: str | None = None  # a width that export wrote as a number: plan() confirms the cut by trial
    coupled_by: str | None = None  # the first op that joins its channels with others (None: a single layer's)

    @property
    def n_channels(self) -> int:
        return next(iter(self.members.values())).shape[0]


class Walk:
    """The state of one walk over an exported graph: the union-find over elements, what froze or
    marked them, the tensor axes they touch (``members``) and every node's :class:`Val`. Rules are
    handed the walk (as torch's fake kernels are handed the fake mode) and act through its methods."""

    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram, heads: str = "dims"):
        self.model, self.ep, self.heads = model, ep, heads
        sig = ep.graph_signature
        self.fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}  # placeholder -> name
        self.values = (dict(model.named_parameters(remove_duplicate=False))  # tied ones under every name
                       | dict(model.named_buffers(remove_duplicate=False)))
        self.shared = self._shared()
        self.approximate: dict[int, str] = {}
        self.speculative: dict[int, str] = {}
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}
        self.reasons = [""]
        self.members: dict[MemberKey, torch.Tensor] = {}
        self.env: dict[fx.Node, object] = {}
        self.joined_by: list[tuple[int, str]] = []  # (element, the op that joined it to another)
        self.layers: dict[str, None] = {}  # the conv/linear modules, in the order they run

    def _shared(self) -> dict[str, str]:
        """Parameters and buffers whose cut would reach more than one place: read by several ops (a
        module called more than once, a weight also read directly) or tied to another module."""
        why = {}
        for node in self.ep.graph.nodes:
            name = self.fqn.get(node.name) if node.op == "placeholder" else None
            if name is None:
                continue
            readers = [u for u in node.users if op_name(u) not in METADATA and not (
                op_name(u) in SHAPE_OF and u.args[0] is not node)]
            if len(readers) > 1:
                owner = name.rpartition(".")[0]
                why[name] = (f"`{owner}` is used more than once: its tensor '{name}' is read by "
                             f"{len(readers)} ops ({', '.join(sorted({emitter(u) for u in readers}))})")
        owners: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(name)
        for names in owners.values():
            for name in names if len(names) > 1 else ():
                why.setdefault(name, f"'{name}' is the same parameter as " + ", ".join(
                    repr(n) for n in names if n != name) + " (tied weights)")
        return why

    # ---- elements ----
    def fresh(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def root(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def join(self, a: torch.Tensor, b: torch.Tensor, strict: str | None = None, via: str | None = None) -> None:
        """Join the elements paired entry by entry. ``strict``: the pairing is a promise that both
        go together, so an element paired with a non-element is frozen with that reason. ``via``: the
        op that couples them (what a single-layer plan reports)."""
        a, b = torch.broadcast_tensors(a, b)
        if strict is not None:
            self.freeze(torch.cat([a[b < 0], b[a < 0]]), strict)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not bool(keep.any()):
            return
        for x, y in unique_pairs(a[keep], b[keep]).tolist():
            rx, ry = self.root(x), self.root(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)
                if via is not None:
                    self.joined_by.append((x, via))

    def freeze(self, ids: torch.Tensor, reason: str) -> None:
        for e in ids[ids >= 0].unique().tolist():
            self.frozen.setdefault(e, reason)

    def mark_approximate(self, ids: torch.Tensor, reason: str) -> None:
        for e in ids[ids >= 0].unique().tolist():
            self.approximate.setdefault(e, reason)

    def mark_speculative(self, ids: torch.Tensor, reason: str) -> None:
        for e in ids[ids >= 0].unique().tolist():
            self.speculative.setdefault(e, reason)

    def varies(self, ids: torch.Tensor, dim: int) -> bool:
        """Whether ``ids`` hold different channels along ``dim``: joined elements are one channel
        (SK-Net's stacked branches, once summed, differ along the branch axis only by name)."""
        if not varies(ids, dim):
            return False
        elements, inverse = ids.unique(return_inverse=True)
        roots = torch.tensor([self.root(e) if e >= 0 else e for e in elements.tolist()], dtype=torch.int64)
        return varies(roots[inverse], dim)

    def reason(self, text: str) -> int:
        self.reasons.append(text)
        return len(self.reasons) - 1

    def lose(self, v: Val, where: torch.Tensor, text: str) -> Val:
        """``v`` with its element entries at ``where`` no longer zero once removed (reason ``text``)."""
        r = self.reason(text)
        return Val(v.ids, torch.where(where & (v.ids >= 0) & (v.lost == 0), r, v.lost).to(torch.int32))

    def consume(self, v: Val) -> None:
        """``v`` is read by a layer: a removed channel must be exactly zero there."""
        bad = (v.ids >= 0) & (v.lost > 0)
        if bool(bad.any()):
            for e, r in unique_pairs(v.ids[bad], v.lost[bad]).tolist():
                self.frozen.setdefault(e, self.reasons[r])

    def member(self, module: str, tensor: str, axis: int, role: str, masked: bool, ids: torch.Tensor,
               **count) -> None:
        key = MemberKey(module, tensor, axis, role, masked, **count)
        if key in self.members:
            self.join(self.members[key], ids, via=f"`{module}.{tensor}`, read twice")
        else:
            self.members[key] = ids

    def count(self, node: fx.Node, op: str, axis: int, ids: torch.Tensor) -> None:
        """``node`` reads the channels ``ids`` (every entry along ``axis``) as a count: after the cut,
        the module that emitted it computes with the original width (:mod:`greg_fast.exact`)."""
        if bool((ids >= 0).any()):
            self.member(module_path(node), "", axis, "count", False, ids, op=op, width=ids.numel())

    def param_member(self, p: Val, ids: torch.Tensor, role: str, masked: bool) -> bool:
        """A parameter (or a view of one) read entry by entry beside channels ``ids`` (broadcast to
        its shape): cut it along them, on the one axis of the parameter whose index says the channel
        (a layer scale's only axis, a position embedding's last). False if there is none."""
        live = ids >= 0
        if not bool(live.any()):
            return True
        name = p.param
        if name is None or name in self.shared:
            return False
        t = self.values[name]
        flat = p.pos.expand(ids.shape).reshape(-1)
        for axis in (d for d, s in enumerate(t.shape) if s > 1):
            n, step = t.shape[axis], math.prod(t.shape[axis + 1:])
            pairs = unique_pairs((flat // step) % n, ids.reshape(-1))
            if len(pairs) != n or bool((pairs[:, 1] < 0).any()):  # one channel per index, every index one
                continue
            at = torch.full((n,), NONE, dtype=torch.int64)
            at[pairs[:, 0]] = pairs[:, 1]
            module, _, tensor = name.rpartition(".")
            self.member(module, tensor, axis, role, masked, at)
            if p.view_of is not None:  # a view at written sizes (timm's ``scale.view(self.shape)``)
                view_pos = self.env[p.view_of].pos
                coord = (view_pos // step) % n
                along_cut = [d for d in range(coord.dim()) if varies(coord, d)]
                if len(along_cut) == 1:
                    self.stored_width(p.view_of, along_cut[0], at[line(coord, along_cut[0])], list(view_pos.shape),
                                      along_cut[0])
            return True
        return False

    def stored_width(self, node: fx.Node, axis: int, channels: torch.Tensor, written: list | None = None,
                     index: int = 0, probe: bool = False) -> str | None:
        """``node`` writes the size of its ``axis`` (entry ``index`` of its ``written`` sizes), which holds
        the channels ``channels``: when an attribute of the module that emitted it gives that size, the
        cut updates it (a "width" member; returns how it is read, :func:`~.stored.width_source`).
        ``probe``: only say how, recording nothing."""
        path = module_path(node)
        spec = width_source(self.model.get_submodule(path), node, channels.numel(), written, index)
        if spec is not None and not probe:
            self.member(path, "", axis, "width", False, channels, op=spec, width=channels.numel())
        return spec

    # ---- values ----
    def none(self, node) -> object:
        return self.none_like(node.meta.get("val") if isinstance(node, fx.Node) else None)

    def none_like(self, meta):
        if isinstance(meta, (tuple, list)):
            return tuple(self.none_like(m) for m in meta)
        shape = meta_shape(meta)
        if shape is None:
            return None
        return Val(torch.full(shape, NONE, dtype=torch.int64), torch.zeros(shape, dtype=torch.int32))

    def val(self, arg):
        return self.env.get(arg) if isinstance(arg, fx.Node) else None

    def tensors_in(self, args) -> list[Val]:
        out = []

        def visit(a):
            v = self.val(a)
            out.extend(x for x in (v if isinstance(v, (tuple, list)) else (v,)) if isinstance(x, Val))
            return a
        fx.node.map_arg(args, visit)
        return out

    def unsupported(self, node: fx.Node, why: str | None = None):
        why = why or f"it feeds {describe(node)}, which greg_fast does not follow"
        for v in self.tensors_in((node.args, node.kwargs)):
            self.freeze(v.ids, why)
        return self.none(node)

    # ---- the walk ----
    def run(self) -> None:
        for node in self.ep.graph.nodes:
            self.env[node] = self.visit(node)

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            v = self.none(node)
            name = self.fqn.get(node.name)
            if name is not None and isinstance(v, Val):
                v.sources, v.pos = frozenset([name]), torch.arange(v.ids.numel()).view(v.ids.shape)
            return v
        if node.op == "output":
            for v in self.tensors_in(node.args):
                self.freeze(v.ids, "it reaches a model output")
            return None
        if node.op != "call_function":
            return self.unsupported(node)
        if node.target is operator.getitem:
            v = self.val(node.args[0])
            return v[node.args[1]] if isinstance(v, (tuple, list)) else self.unsupported(node)
        name = op_name(node)
        if name in METADATA:
            return None
        operands = self.tensors_in((node.args, node.kwargs))
        if not operands:
            return self.none(node)  # a new tensor (zeros, arange): no channel of a producer
        if all(v.sources for v in operands):
            return self.derived(node, name, operands)
        rule = rule_for(name, node)
        out = self.unsupported(node) if rule is None else self.apply(rule, node)
        if writes_first_argument(node):
            self.env[node.args[0]] = out  # in place: later readers of the input read this
        return out

    def apply(self, rule: Rule, node: fx.Node):
        """Call ``rule`` on ``node``; a rule that acts on one argument gets its value, checked here."""
        args = bind(node)
        if rule.x is None:
            return rule.fn(self, node, args)
        x = self.val(args[rule.x] if isinstance(rule.x, str) else node.args[rule.x] if node.args else None)
        if not isinstance(x, Val) or (rule.activation and x.sources):
            return self.unsupported(node)
        return rule.fn(self, node, args, x)

    def derived(self, node: fx.Node, name: str | None, operands: list[Val]):
        """A value computed from parameters and buffers alone (a standardized weight, a view of a
        layer scale): no channels of its own; a view of one parameter keeps where its entries are."""
        out = self.none(node)
        if not isinstance(out, Val):
            return out
        out.sources = frozenset().union(*(v.sources for v in operands))
        src = operands[0]
        if len(operands) == 1 and src.pos is not None and name in MOVEMENT:
            out.pos = move(node, name, src.pos)
            out.view_of = node if name in ("view", "_unsafe_view", "reshape") else src.view_of
        return out


def collect_groups(walk: Walk) -> list[Group]:
    """The walk's components as groups: components that touch the same tensor axes form one."""
    index = {key: i for i, key in enumerate(walk.members)}
    where: dict[int, dict[int, list[int]]] = {}  # component -> member index -> positions
    for key, i in index.items():
        for pos, e in enumerate(walk.members[key].tolist()):
            if e >= 0:
                where.setdefault(walk.root(e), {}).setdefault(i, []).append(pos)
    frozen: dict[int, str] = {}
    for e, why in walk.frozen.items():
        frozen.setdefault(walk.root(e), why)
    approximate: dict[int, str] = {}
    for e, why in walk.approximate.items():
        approximate.setdefault(walk.root(e), why)
    speculative: dict[int, str] = {}
    for e, why in walk.speculative.items():
        speculative.setdefault(walk.root(e), why)
    coupled_by: dict[int, str] = {}
    for e, via in walk.joined_by:
        coupled_by.setdefault(walk.root(e), via)
    by_signature: dict[tuple, list[int]] = {}
    for comp, touched in where.items():
        by_signature.setdefault(tuple(sorted((i, len(p)) for i, p in touched.items())), []).append(comp)
    keys = list(walk.members)
    module_order = {m: i for i, (m, _) in enumerate(walk.model.named_modules())}
    out, seen = [], {}
    for signature, comps in by_signature.items():
        touched = [keys[i] for i, _ in signature]
        first = signature[0][0]
        comps.sort(key=lambda c: min(where[c][first]))
        members = {keys[i]: torch.tensor([sorted(where[c][i]) for c in comps], dtype=torch.int64)
                   for i, _ in signature}
        filters = [k for k in touched if k.role == "filter"]
        name = (filters or touched)[0].module
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        reason = next((frozen[c] for c in comps if c in frozen), None)
        if reason is None and not filters:
            reason = "it has no filters to remove"
        order = min((module_order.get(k.module, 0) for k in filters), default=len(module_order))
        out.append((order, Group(name, members, reason,
                                 next((approximate[c] for c in comps if c in approximate), None),
                                 next((speculative[c] for c in comps if c in speculative), None),
                                 next((coupled_by[c] for c in comps if c in coupled_by), None))))
    return [g for _, g in sorted(out, key=lambda x: x[0])]


def walk_model(model: nn.Module, example_inputs: tuple, heads: str = "dims") -> Walk:
    walk = Walk(model, export(model, example_inputs), heads)
    walk.run()
    return walk


def unfiltered(name: str, shared: dict) -> str:
    """Why a layer that runs has its filters in no group."""
    return shared.get(f"{name}.weight", "greg_fast cannot cut its weight along its filters")
