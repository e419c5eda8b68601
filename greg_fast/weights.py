"""Dense weights saved by other code, loaded into a model of ours: :func:`load_weights`.

Checkpoints come as a bare ``state_dict`` or inside a trainer's dict (``{'state_dict': ...}``,
``{'model': ...}``), with keys prefixed by a wrapper (``module.`` from DataParallel/DDP,
``_orig_mod.`` from ``torch.compile``, ``model.`` from a LightningModule), and sometimes with
layers named otherwise (a classifier ``linear`` where ours is ``fc``). What can be matched without
guessing is: prefixes every key carries, and names that differ while the tensors, in order, have
the same shapes one to one. Anything else is a mismatch, named once with the first few keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

CONTAINERS = ("state_dict", "model_state_dict", "model", "net", "weights")  # where trainers put the weights
SHOWN = 5  # keys named per kind of mismatch


def _tensors(obj, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in CONTAINERS:
            if isinstance(obj.get(key), Mapping):
                return _tensors(obj[key], f"{where}[{key!r}]")
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ValueError(f"{where}: expected a state_dict (names to tensors) or a dict holding one under "
                         f"{' / '.join(repr(k) for k in CONTAINERS)}; found keys {keys}")
    raise ValueError(f"{where}: expected a state_dict, found a {type(obj).__name__}")


def _strip_prefixes(state: dict[str, torch.Tensor], wanted: set[str]) -> tuple[dict, list[str]]:
    """Strip the leading ``name.`` parts that every key carries, as many as match most of ``wanted``
    (none where stripping matches no more)."""
    best, stripped, prefixes = state, [], []
    while state and all("." in k for k in state) and len({k.split(".", 1)[0] for k in state}) == 1:
        prefix = next(iter(state)).split(".", 1)[0] + "."
        state, prefixes = {k[len(prefix):]: v for k, v in state.items()}, prefixes + [prefix]
        if len(state.keys() & wanted) > len(best.keys() & wanted):
            best, stripped = state, list(prefixes)
    return best, stripped


def _renames(state: dict, target: dict) -> dict[str, str]:
    """Checkpoint key -> model key for the unmatched keys, where both sides' unmatched tensors have
    the same shapes in order, one to one (else none)."""
    extra = [k for k in state if k not in target]
    missing = [k for k in target if k not in state]
    if not extra or len(extra) != len(missing):
        return {}
    if any(tuple(state[a].shape) != tuple(target[b].shape) for a, b in zip(extra, missing)):
        return {}
    return dict(zip(extra, missing))


def _shown(pairs: list[str]) -> str:
    return ", ".join(pairs[:SHOWN]) + (f" and {len(pairs) - SHOWN} more" if len(pairs) > SHOWN else "")


def _collapsed(renames: Mapping[str, str]) -> list[str]:
    """``linear.weight -> fc.weight, linear.bias -> fc.bias`` as ``linear.* -> fc.*``."""
    out = []
    for a, b in renames.items():
        (pa, _, la), (pb, _, lb) = a.rpartition("."), b.rpartition(".")
        out.append(f"{pa}.* -> {pb}.*" if la == lb and pa and pb else f"{a} -> {b}")
    return list(dict.fromkeys(out))


def load_weights(model: nn.Module, source, *, map_location="cpu", what: str | None = None) -> list[str]:
    """Load dense weights saved by other code into ``model``: ``source`` is a path (read with
    ``weights_only=True``) or what ``torch.load`` gave. Accepts a bare state_dict or one under
    ``state_dict`` / ``model_state_dict`` / ``model`` / ``net`` / ``weights``; strips prefixes every
    key carries (``module.``, ``_orig_mod.``, ``model.``); renames keys that differ where the unmatched
    tensors have the same shapes one to one, in order; leaves a missing ``num_batches_tracked`` at
    its value. Returns what it changed, in words. Raises ``ValueError`` naming the first differing
    keys and shapes when the weights do not fit; the model is untouched then."""
    where = what or (str(source) if isinstance(source, (str, Path)) else "the checkpoint")
    if isinstance(source, (str, Path)):
        try:
            source = torch.load(source, map_location=map_location, weights_only=True)
        except Exception as err:
            raise ValueError(f"{where}: cannot be read as a weights-only torch file ({type(err).__name__}: "
                             f"{str(err)[:300]})") from err
    state = _tensors(source, where)
    target = model.state_dict()
    state, stripped = _strip_prefixes(state, set(target))
    notes = [f"stripped the prefix {p!r} from every key" for p in stripped]
    for k, t in target.items():  # counters that older checkpoints lack
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = t
    renames = _renames(state, target)
    if renames:
        state = {renames.get(k, k): v for k, v in state.items()}
        notes.append("renamed " + ", ".join(_collapsed(renames)) + " (same shapes, in order)")
    missing = [f"{k} {list(target[k].shape)}" for k in target if k not in state]
    extra = [f"{k} {list(state[k].shape)}" for k in state if k not in target]
    shapes = [f"{k}: {list(state[k].shape)} in the checkpoint, {list(t.shape)} in the model"
              for k, t in target.items() if k in state and state[k].shape != t.shape]
    if missing or extra or shapes:
        parts = ([f"{len(shapes)} tensors differ in shape ({_shown(shapes)})"] if shapes else []) + (
            [f"the model has {len(missing)} keys the checkpoint lacks ({_shown(missing)})"] if missing else []) + (
            [f"the checkpoint has {len(extra)} keys the model lacks ({_shown(extra)})"] if extra else [])
        done = f" (after the changes it could make: {'; '.join(notes)})" if notes else ""
        raise ValueError(f"{where} does not fit {type(model).__name__}{done}: {'; '.join(parts)}. Check the "
                         "model name and its number of classes (and input channels) against the checkpoint's")
    model.load_state_dict(state)
    return notes
