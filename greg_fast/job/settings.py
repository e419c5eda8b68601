"""The job's settings: which flags a resume must agree on, which it reads back, and every check of
them that needs no data (run before anything is written)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..budget import target_from_args
from ..hyper import Hyper
from ..plan import check_options
from ..train import parse_lr_schedule, resolve_device

# the plan options as the command line spells them (plan.check_options names them in its errors)
CLI_NAMES = {"granularity": "--granularity", "coupled": "--coupled", "not_coupled": "--no-coupled",
             "approximate": "--approximate", "target": "--target-flops/--target-params/--target-latency",
             "allocation": "--allocation", "max_ratio": "--max-ratio", "round_to": "--round-to", "ratio": "--ratio",
             "needs_target": "it needs --target-flops, --target-params or --target-latency"}

# Arguments that must agree between a run and its resume.
HYPER_FIELDS = tuple(f.name for f in dataclasses.fields(Hyper))
BUDGET_FLAGS = ("target_flops", "target_params", "target_latency", "allocation", "max_ratio", "round_to", "latency_batch_size")
RUN_IDENTITY = ("model", "data", "image_size", "normalize", "train_subset", "test_subset", "method", "granularity", "coupled", "approximate", "heads", "penalize", "ratio", "stage_ratios",
                 "skip", *BUDGET_FLAGS, *HYPER_FIELDS,
                 "pretrain_epochs", "checkpoint", "finetune_epochs", "lr_ft", "lr_pretrain", "lr_reg",
                 "momentum", "weight_decay", "batch_size", "seed")


def identity(args) -> dict:
    return {k: getattr(args, k) for k in RUN_IDENTITY}


# What `--resume DIR` alone reads back besides the identity: flags that may change on a resume
# but that the run needs (--device, --quiet and --out come from the resuming command).
STORED = (*RUN_IDENTITY, "recipe", "data_dir", "checkpoint_every", "max_skipped_steps",
           "latency_batch_sizes", "latency_seconds", "no_latency", "export")


def settings_diff(saved: dict, now: dict) -> str | None:
    """``key=saved (now new), ...`` for every setting in ``now`` that ``saved`` holds otherwise; None
    when they agree (a resumed job, a compare folder run again)."""
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    return ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items()) if diff else None


def max_regularization_iterations(args) -> int:
    """Steps until ``done`` if only the ceiling stops growth (the magnitude ratio can stop it earlier)."""
    return Hyper.from_settings(args.method, **{k: getattr(args, k) for k in HYPER_FIELDS}).max_steps(args.method)


def check_args(args) -> None:
    """Every argument that can be checked without data, before anything runs or is written: a bad
    one must not surface after an hour of pretraining."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if args.resume is not None and Path(args.resume) != out:
        raise ValueError("--resume DIR must be the run's --out DIR")
    target = target_from_args(args)
    if sum(x is not None for x in (args.ratio, args.stage_ratios, target)) != 1:
        raise ValueError("give exactly one of --ratio, --stage-ratios and a --target-flops/--target-params/"
                         "--target-latency")
    check_options(args.granularity, coupled(args), args.approximate, None, target, args.allocation, args.max_ratio,
                  args.round_to, names=CLI_NAMES)
    if target is not None and target.get("batch_size", 1) < 1:
        raise ValueError(f"--latency-batch-size must be >= 1, got {args.latency_batch_size}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--checkpoint-every", args.checkpoint_every, 1),
                             ("--pretrain-epochs", args.pretrain_epochs, 0),
                             ("--finetune-epochs", args.finetune_epochs, 0),
                             ("--max-skipped-steps", args.max_skipped_steps, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--lr-reg", args.lr_reg), ("--lr-pretrain", args.lr_pretrain),
                        ("--latency-seconds", args.latency_seconds)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a finite number > 0, got {value}")
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    parse_lr_schedule(args.lr_ft)
    resolve_device(args.device)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    Hyper.from_settings(**greg_kwargs(args))


def coupled(args) -> bool:
    """Whether the run plans coupled groups: asked for, or by default with filters and --ratio (the
    reference's stage lists are per-layer settings: they plan single layers unless told otherwise)."""
    if args.coupled is not None:
        return args.coupled
    return args.granularity == "filter" and args.stage_ratios is None


def greg_kwargs(args) -> dict:
    return {"method": args.method, **{name: getattr(args, name) for name in HYPER_FIELDS}}
