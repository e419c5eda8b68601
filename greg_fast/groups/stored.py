"""Widths a module's forward reads from its attributes (``reshape(B, N, self.num_heads,
self.head_dim)``, ``split([self.key_dim, self.val_dim])``, ``torch.split(x, self.width, 1)``,
``scale.view(self.shape)``): export writes them as numbers, so the cut must update the attribute.

Which attribute: the one the line of code that emitted the op passes at that place (from the
node's stack trace), read as ``self.name`` or ``self.name // k``; where the line does not say, an
attribute that holds the written sizes or the size. plan() confirms every such cut by a trial
compaction, and :func:`set_attribute` applies it.
"""
from __future__ import annotations

import functools
import inspect
import re

import torch.fx as fx
import torch.nn as nn

from .values import op_name

_CALLED_AS = {"split_with_sizes": ("split",), "split": ("split",), "view": ("view", "reshape"),
              "_unsafe_view": ("view", "reshape"), "reshape": ("reshape", "view")}
_READ = re.compile(r"self\.(\w+)(?:\s*//\s*(?:(\d+)|self\.(\w+)))?")


def _arguments(text: str) -> list[str]:
    """The top-level, comma-separated arguments at the start of ``text`` (just after an opening bracket)."""
    out, depth, current = [], 0, ""
    for ch in text:
        if ch in ")]}" and depth == 0:
            return [a.strip() for a in out + [current] if a.strip()]
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            out, current = out + [current], ""
        else:
            current += ch
    return []


def size_argument(node: fx.Node, index: int, count: int, line: str | None = None) -> str | None:
    """The code the line that emitted ``node`` (or ``line``) passes as size ``index`` of ``count`` (one
    size, or the one size of an equal split), or None when the line does not say."""
    if line is None:
        line = (node.meta.get("stack_trace") or "").rstrip().rpartition("\n")[2]
    for called in _CALLED_AS.get(op_name(node) or "", ()):
        at = line.rfind(called + "(")
        if at < 0:
            continue
        args = [a for a in _arguments(line[at + len(called) + 1:]) if "=" not in a]
        if called == "split" and line[:at].endswith("torch."):
            args = args[1:]  # torch.split(x, sizes, dim)
        if called == "split":
            args = args[:1]
        if len(args) == 1 and args[0][:1] in "[(":
            args = _arguments(args[0][1:])
        if len(args) == count:
            return args[index]
        if called == "split" and len(args) == 1:  # one size for equal pieces
            return args[0]
    return None


def bound_source(module: nn.Module, node: fx.Node, bound: int) -> str | None:
    """The attribute the line that emitted a slice reads its bound from (DPN's ``x[:, :self.num_1x1_c]``):
    the one ``self.<name>`` of the line that holds ``bound``, else None."""
    line = (node.meta.get("stack_trace") or "").rstrip().rpartition("\n")[2]
    names = [n for n in dict.fromkeys(re.findall(r"\bself\.(\w+)", line)) if _int(module, n) == bound]
    return names[0] if len(names) == 1 else None


def _int(module: nn.Module, name: str | None):
    value = vars(module).get(name) if name else None
    return value if type(value) is int else None


def _read(module: nn.Module, text: str, size: int) -> str | None:
    """``text`` (``self.name``, ``self.name // k``) as an attribute spec when it gives ``size``."""
    read = _READ.fullmatch(text)
    if read is None:
        return None
    name, k = read.group(1), int(read.group(2) or _int(module, read.group(3)) or 0)
    value = _int(module, name)
    if value is not None and (value == size if not read.group(2) and not read.group(3) else
                              k > 0 and value % k == 0 and value // k == size):
        return name if not k else f"{name}//{k}"
    return None


@functools.lru_cache(maxsize=None)
def _source_lines(code) -> tuple[str, ...]:
    """The source of a class or function, line by line (none where Python cannot find it)."""
    try:
        return tuple(inspect.getsource(code).splitlines())
    except (OSError, TypeError):
        return ()


def width_source(module: nn.Module, node: fx.Node, size: int, written: list | None, index: int) -> str | None:
    """How ``module`` gives ``node`` its size ``size`` (entry ``index`` of the ``written`` sizes): an
    attribute ``"name"``, an entry ``"name[i]"`` of a tuple or list, or ``"name//k"``; None when no
    attribute does (the code computes it otherwise). Where the emitting line does not say (the op
    runs in a method forward calls), the calls of that op in the module's class that pass one
    attribute giving the size say it; failing those, the one attribute of that value (of several,
    the one forward reads)."""
    text = size_argument(node, index, len(written)) if written is not None else None
    if text is not None:
        spec = _read(module, text, size)
        if spec is not None or _READ.fullmatch(text) is None:
            return spec  # an attribute, or computed from something else (the input's shape, a number)
        if not isinstance(vars(module).get(_READ.fullmatch(text).group(1)), (tuple, list)):
            return None
    plain = [(k, v) for k, v in vars(module).items() if not k.startswith("_") and k != "training"]
    for k, v in plain:
        if written is not None and isinstance(v, (tuple, list)) and list(v) == list(written):
            return f"{k}[{index}]"
    if text is not None:
        return None
    if written is not None:
        in_class = {_read(module, t, size) for line in _source_lines(type(module))
                    if (t := size_argument(node, index, len(written), line)) is not None} - {None}
        if len(in_class) == 1:
            return in_class.pop()
    by_value = [k for k, v in plain if type(v) is int and v == size]
    if len(by_value) > 1:  # several of that value (MultiheadAttention's embed_dim, kdim, vdim): those forward reads
        read = set(re.findall(r"\bself\.(\w+)", "\n".join(_source_lines(type(module).forward))))
        by_value = [k for k in by_value if k in read]
    return by_value[0] if len(by_value) == 1 else None


def set_attribute(module: nn.Module, spec: str, value: int) -> None:
    """Set the attribute ``spec`` names (:func:`width_source`) so that it gives ``value``."""
    name, _, rest = spec.partition("[")
    name, _, k = name.partition("//")
    if rest:
        old = getattr(module, name)
        i = int(rest.rstrip("]"))
        value = type(old)(list(old[:i]) + [value] + list(old[i + 1:]))
    elif k:
        value = value * int(k)
    setattr(module, name, value)
    module.greg_stored = {**getattr(module, "greg_stored", {}), name: value}


def stored_of(model: nn.Module) -> dict[str, dict]:
    """``{module name: {attribute: value}}`` for every attribute a cut set (what a saved model records,
    so that :func:`set_attribute` can set it again on load; tuples as lists)."""
    return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in m.greg_stored.items()}
            for name, m in model.named_modules() if getattr(m, "greg_stored", None)}
