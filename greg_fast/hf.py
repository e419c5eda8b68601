"""Hugging Face models after compaction: a folder that loads back exactly.

``transformers``' own ``from_pretrained`` builds the architecture the config describes, which a
compacted model no longer has: it refuses the smaller weights, or with ``ignore_mismatched_sizes``
loads a silently re-initialized model. :func:`save_pretrained` writes ``config.json``,
``model.safetensors`` (under the module's own parameter names) and, beside them,
``greg_fast.json``: the pruned widths of every conv, linear and norm, the counts exact norms keep
and the widths modules store. :func:`from_pretrained` builds the config's architecture, shrinks it
to those widths and loads the weights, checked. :class:`GRegTrainerCallback` does for ``transformers.Trainer`` what
:class:`greg_fast.lightning.GRegCallback` does for Lightning. ``pip install 'greg-fast[hf]'``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

try:
    import transformers
    from safetensors.torch import load_file, save_model
except ImportError as err:
    raise ImportError(f"greg_fast.hf needs transformers and safetensors ({err}): pip install 'greg-fast[hf]'") from None

from .atomic import write_text_atomic
from .capture import unwrap
from .engine import GrowingReg
from .io import architecture, rebuild
from .trainers import MakeOptimizer, finish_regularization

FORMAT = "greg_fast.hf/1"
WIDTHS_FILE = "greg_fast.json"


def save_pretrained(model: nn.Module, folder: str | Path) -> Path:
    """Write a (compacted) Hugging Face ``PreTrainedModel`` to ``folder``: its config, its weights
    (safetensors) and ``greg_fast.json`` with the pruned widths. Returns the folder."""
    model = unwrap(model)
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"save_pretrained needs a Hugging Face PreTrainedModel, got {type(model).__name__}; "
                        "use greg_fast.save for other models")
    folder = Path(folder)
    model.config.save_pretrained(folder)
    # the weights under the module's own names: transformers' save_pretrained renames some to older
    # checkpoint names (Swin's attention.self.query for attention.q_proj), which only its own loader undoes
    save_model(model, str(folder / "model.safetensors"))
    record = {"format": FORMAT, "model_class": type(model).__name__, **architecture(model)}
    write_text_atomic(folder / WIDTHS_FILE, json.dumps(record, indent=1))  # last: the folder is complete
    return folder


def from_pretrained(folder: str | Path, model_class: type | None = None) -> nn.Module:
    """The model :func:`save_pretrained` wrote to ``folder``: its class (``model_class``, or the one
    ``greg_fast.json`` names) built from ``config.json``, shrunk to the saved widths, the weights
    loaded (in eval mode). A folder without ``greg_fast.json`` (never compacted) loads as it is.
    Raises ``ValueError`` where the widths file and the weights disagree."""
    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors (write the folder with greg_fast.hf.save_pretrained)")
    record_file = folder / WIDTHS_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    if record is not None and (record.get("format") != FORMAT or "widths" not in record):
        raise ValueError(f"{record_file}: not a greg_fast widths file (expected format {FORMAT!r})")
    config = transformers.AutoConfig.from_pretrained(folder)
    if model_class is None:
        name = record["model_class"] if record else (config.architectures or [None])[0]
        model_class = getattr(transformers, name or "", None)
        if model_class is None:
            raise ValueError(f"{folder}: cannot tell the model class ({name!r} is not one of transformers'): "
                             "pass model_class=")
    model = model_class(config)
    state = load_file(str(weights))
    if record is None:
        model.load_state_dict(state)
        return model.eval()
    try:
        return rebuild(model, state, record["widths"], record.get("counts") or {}, record.get("stored") or {},
                       folder).eval()
    except ValueError as err:
        raise ValueError(f"{err} ({WIDTHS_FILE} does not describe model.safetensors: was one of them replaced?)") from None


class GRegTrainerCallback(transformers.TrainerCallback):
    """For ``transformers.Trainer(..., optimizers=(greg, scheduler))`` (the scheduler of the wrapper):
    when the schedule is done, compact ``model`` (the module the plan was built for) in place and go
    on training the smaller model in the same ``train()``, with GrowingReg's inner optimizer (its state
    cut to the kept channels) or ``make_optimizer(params)``, and ``make_scheduler(optimizer)`` as the
    LR scheduler (default: the learning rate stays where it is; HF's default linear decay would
    otherwise have been planned over the whole run). Give ``max_steps`` =
    ``greg.max_steps()`` + the fine-tune steps."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer | None = None, make_scheduler=None):
        self.model, self.make_optimizer, self.make_scheduler = model, make_optimizer, make_scheduler
        self.compacted = False

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:  # the loop holds its DDP wrapper in a local: no hook can wrap the small model
            raise ValueError(f"GRegTrainerCallback compacts in place, which the Trainer's DistributedDataParallel "
                             f"wrapper (world size {args.world_size}) cannot follow: it would go on syncing the "
                             "parameters compaction replaced. Under DDP regularize with "
                             "Trainer(max_steps=greg.max_steps()), compact (greg_fast.compact), and fine-tune with "
                             "a new Trainer; or use Lightning's GRegCallback, which wraps the small model again")

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.compacted:
            return
        greg = optimizer if isinstance(optimizer, GrowingReg) else getattr(optimizer, "optimizer", None)
        if not isinstance(greg, GrowingReg):
            raise TypeError("GRegTrainerCallback needs Trainer(optimizers=(greg_fast.GrowingReg(...), scheduler)), "
                            f"got {type(greg).__name__}")
        if not greg.done:
            return
        if greg is optimizer:
            raise TypeError("the Trainer steps the GrowingReg itself (not accelerate's wrapper of it): the callback "
                            "cannot hand it the small model's optimizer")
        new = finish_regularization(greg, self.model, self.make_optimizer)
        optimizer.optimizer = new  # the Trainer keeps stepping the same wrapper object
        schedule = (self.make_scheduler(new) if self.make_scheduler is not None
                    else torch.optim.lr_scheduler.LambdaLR(new, lambda step: 1.0))
        if lr_scheduler is not None:
            # the Trainer steps the object it holds, and no hook hands it another: that object becomes
            # the new scheduler (accelerate's wrapper, if any, holds the one it steps in .scheduler)
            held = getattr(lr_scheduler, "scheduler", lr_scheduler)
            held.__class__, held.__dict__ = schedule.__class__, schedule.__dict__
        self.compacted = True
