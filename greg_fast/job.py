"""The ``greg-fast prune`` job: pretrain (or load) -> regularize -> prune -> fine-tune -> evaluate.

Writes to ``out``: ``metrics.jsonl`` (one record per epoch and per trace point), ``summary.json``,
``model.pt`` (``torch.load(..., weights_only=True)``), ``regularization.pt`` (λ and score traces),
``lambda_schedule.png``, ``score_distribution.png``, ``accuracy.png`` and ``checkpoints/`` (the
last two, each written atomically every ``--checkpoint-every`` steps, at every phase change and
after every epoch; ``--resume`` continues from the newest one that loads).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as datasets
from . import models, plots, table
from .atomic import save_atomic, write_text_atomic
from .compaction import compact, output_change
from .masks import apply_masks
from .io import save as save_model
from .sparse import pack_model
from .engine import GrowingReg
from .hyper import Hyper
from .recipes import RECIPES
from .budget import batch_inputs, measure_speedup, parse_target, target_from_args
from .plan import count_flops, plan as make_plan, stage_ratios
from .train import epoch_metrics, evaluate, lr_at, n_batches, parse_lr_schedule, resolve_device, train_epoch

# Arguments that must agree between a run and its resume.
_HYPER = tuple(f.name for f in dataclasses.fields(Hyper))
_BUDGET = ("target_flops", "target_params", "target_latency", "allocation", "max_ratio", "round_to", "latency_batch_size")
_RUN_IDENTITY = ("model", "data", "method", "granularity", "coupled", "approximate", "penalize", "ratio", "stage_ratios",
                 "skip", *_BUDGET, *_HYPER,
                 "pretrain_epochs", "checkpoint", "finetune_epochs", "lr_ft", "lr_pretrain", "lr_reg",
                 "momentum", "weight_decay", "batch_size", "seed")


@dataclass
class RunState:
    """Everything a resumed run needs besides model and optimizer tensors."""
    stage: str = "pretrain"
    epoch: int = 0                       # next epoch to run within the stage
    batch: int = 0                       # next batch of that epoch
    step: int = 0                        # steps done in the stage
    sums: dict | None = None             # running totals of the unfinished epoch
    saves: int = 0                       # checkpoints written
    skipped_steps: int = 0               # steps skipped for non-finite gradients
    records: list = field(default_factory=list)
    trace: list = field(default_factory=list)
    phase_changes: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)


def _identity(args) -> dict:
    return {k: getattr(args, k) for k in _RUN_IDENTITY}


# What `--resume DIR` alone reads back besides the identity: flags that may change on a resume
# but that the run needs (--device, --quiet and --out come from the resuming command).
_STORED = (*_RUN_IDENTITY, "recipe", "data_dir", "checkpoint_every", "max_skipped_steps",
           "latency_batch_sizes", "latency_seconds", "no_latency")


def stored_settings(out) -> dict:
    """The flags the run in ``out`` was started with, from its newest checkpoint (runs from before
    settings were stored give their identity)."""
    ckpt = _load_latest(Path(out), "cpu", report=False)  # the run reports it
    return dict(ckpt.get("settings") or ckpt["identity"])


def _max_regularization_iterations(args) -> int:
    """Steps until ``done`` if only the ceiling stops growth (the magnitude ratio can stop it earlier)."""
    if args.method == "l1":
        return 0
    picks = math.ceil(args.pick_ceiling / args.pick_delta - 1e-9) if args.method == "greg2" else 0
    start = picks * args.pick_delta if args.method == "greg2" else 0.0
    grows = math.floor((args.ceiling - start) / args.delta + 1e-9) + 1
    return (picks + grows - 1) * args.interval + args.stabilize + 1


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("ckpt-*.pt"))


def _load_latest(out: Path, device, report: bool = True) -> dict:
    """The newest checkpoint that loads completely (a torn or corrupt file falls back to the one
    before, said on stderr with ``report``)."""
    paths = _checkpoints(out)
    if not paths:
        raise FileNotFoundError(f"--resume {out}: no checkpoints/ckpt-*.pt there")
    errors = []
    for path in reversed(paths):
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
            if isinstance(obj, dict) and {"identity", "state", "model", "optimizer", "rng"} <= obj.keys():
                return obj
            errors.append(f"{path.name}: not a greg-fast checkpoint")
        except Exception as err:  # truncated, corrupt, unreadable
            errors.append(f"{path.name}: {type(err).__name__}: {err}")
        if report:
            print(f"greg-fast: skipping unusable checkpoint {errors[-1]}", file=sys.stderr)
    raise ValueError(f"--resume {out}: no usable checkpoint ({'; '.join(errors)})")


def _init_distributed(device: torch.device) -> tuple[torch.device, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on CUDA, gloo on CPU) and
    use this rank's GPU. Returns (device, rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank()


def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The model to train: wrapped in DistributedDataParallel under torch.distributed (wrapped anew
    for each stage, since compaction replaces parameters)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def _fault_injection(stage: str, step: int) -> None:
    """Test hook: GREG_FAST_KILL_AT=stage:step kills this process (SIGKILL) after that step."""
    target = os.environ.get("GREG_FAST_KILL_AT")
    if target and target == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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
    if target is not None:
        parse_target(target)
        if target.get("batch_size", 1) < 1:
            raise ValueError(f"--latency-batch-size must be >= 1, got {args.latency_batch_size}")
    else:
        for flag, value in (("--allocation", args.allocation), ("--max-ratio", args.max_ratio)):
            if value is not None:
                raise ValueError(f"{flag} spreads a budget: it needs --target-flops, --target-params or --target-latency")
    if args.max_ratio is not None and not 0 < args.max_ratio < 1:
        raise ValueError(f"--max-ratio must be in (0, 1), got {args.max_ratio}")
    if args.round_to is not None and args.round_to < 1:
        raise ValueError(f"--round-to must be >= 1, got {args.round_to}")
    if args.round_to is not None and args.granularity == "weight":
        raise ValueError("--round-to rounds channel counts; --granularity weight has none")
    if args.coupled and args.granularity != "filter":
        raise ValueError(f"--coupled prunes groups of filters; --granularity {args.granularity} plans single layers")
    if args.approximate and not _coupled(args):
        raise ValueError("--approximate cuts coupled groups: it needs --coupled (or --ratio with filters)")
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
    Hyper.from_settings(**_greg_kwargs(args))


def _coupled(args) -> bool:
    """Whether the run plans coupled groups: asked for, or by default with filters and --ratio (the
    reference's stage lists are per-layer settings: they plan single layers unless told otherwise)."""
    if args.coupled is not None:
        return args.coupled
    return args.granularity == "filter" and args.stage_ratios is None


def _greg_kwargs(args) -> dict:
    return {"method": args.method, **{name: getattr(args, name) for name in _HYPER}}


def run(args) -> dict:
    """Run (or resume) the whole job; returns the summary."""
    job = _Run(args)
    for stage, step in (("pretrain", job.pretrain), ("regularize", job.regularize), ("finetune", job.finetune)):
        if job.state.stage == stage:
            step()
    return job.finish()


class _Run:
    """One ``greg-fast prune`` run: set-up (and resume) here, then one method per stage. ``state``
    (a :class:`RunState`) is all that a checkpoint holds besides tensors."""

    def __init__(self, args):
        check_args(args)
        self.args, self.out = args, Path(args.out)
        if args.resume is None and _checkpoints(self.out):
            raise FileExistsError(f"{self.out} holds checkpoints of a run: pass --resume {self.out} to continue "
                                  "it, or choose another --out")
        self.lr_ft = parse_lr_schedule(args.lr_ft)
        self.data = datasets.load(args.data, args.data_dir)
        self.device, rank = _init_distributed(resolve_device(args.device))
        self.main_rank = rank == 0
        torch.manual_seed(args.seed)
        self.model = models.create(args.model, self.data.num_classes, in_channels=self.data.in_channels).to(self.device)
        self.example = (self.data.train[0][0].unsqueeze(0).to(self.device),)
        collapsed = models.collapsed_convs(self.model, self.example)
        if collapsed and self.main_rank:
            size = "x".join(map(str, self.example[0].shape[2:]))
            warnings.warn(f"--model {args.model} shrinks the {size} images of --data {args.data} to 1x1 before {len(collapsed)} "
                          f"of its convolutions with kernels over 1x1 (from `{collapsed[0]}` on): they see mostly "
                          "padding, and accuracy may stay near chance. Use a model made for this image size "
                          "(the CIFAR ResNets for 32x32 or smaller) or larger images", stacklevel=2)
        self.structured = args.granularity != "weight"
        self.state = RunState()
        self.checkpoint = _load_latest(self.out, self.device) if args.resume is not None else None
        saved = self.checkpoint["state"]["results"].get("allocation") if self.checkpoint is not None else None
        self.plan = self._make_plan(saved)
        if self.plan.budget is not None:
            self.state.results["allocation"] = {"counts": {l.name: l.n_prune for l in self.plan.layers},
                                                "flops_keep": self.plan.budget.flops_keep,
                                                "achieved": self.plan.budget.achieved}
        if self.checkpoint is not None:
            self._resume()
        if self.main_rank:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.quiet = args.quiet or not self.main_rank  # rank 0 alone reports and writes
        self.clock = time.perf_counter()
        self.steps_per_epoch = n_batches(self.data.train, args.batch_size)

    def _make_plan(self, saved: dict | None):
        """The run's plan; a resumed latency target takes the allocation measured when the run started
        (measuring again would give other counts, within the noise)."""
        args = self.args
        ratios = stage_ratios(self.model, args.stage_ratios) if args.stage_ratios is not None else None
        target = target_from_args(args)
        kwargs = dict(granularity=args.granularity, coupled=_coupled(args), approximate=args.approximate,
                      ratios=ratios, skip=args.skip or (), example_inputs=self.example, round_to=args.round_to)
        if target is None:
            return make_plan(self.model, args.ratio, **kwargs)
        kwargs.update(allocation=args.allocation, max_ratio=args.max_ratio)
        if saved is None or "latency" not in target:
            return make_plan(self.model, target=target, **kwargs)
        plan = make_plan(self.model, target={"flops": saved["flops_keep"]}, **kwargs)
        plan.budget.restore(parse_target(target), saved["achieved"], saved["flops_keep"])
        plan.set_counts(saved["counts"])
        return plan

    def _resume(self) -> None:
        # runs started before coupled groups existed planned single layers: --no-coupled resumes them
        saved = {"coupled": False, "approximate": False, "penalize": "filters", **{k: None for k in _BUDGET},
                 "latency_batch_size": 64, **self.checkpoint["identity"]}
        diff = {k: (saved.get(k), v) for k, v in _identity(self.args).items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"--resume {self.out}: the run was started with other settings: "
                             + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items()))
        self.state = RunState(**self.checkpoint["state"])
        masks = self.state.results.get("masks")
        if masks is not None:  # pruned already: the counts are the masks' (a global budget chose them late)
            self.plan.set_counts({k: int((~m).sum()) for k, m in masks.items()})
        if self.state.stage in ("finetune", "finished") and self.structured:  # the checkpoint holds the small model
            compact(self.model, masks, self.plan)
        self.model.load_state_dict(self.checkpoint["model"])
        torch.set_rng_state(self.checkpoint["rng"])

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text)

    def _restore(self, optimizer) -> None:
        """Load the checkpoint's optimizer state into the first stage that runs after a resume."""
        if self.checkpoint is not None and self.checkpoint["optimizer"] is not None:
            optimizer.load_state_dict(self.checkpoint["optimizer"])
        self.checkpoint = None

    # ---- bookkeeping ----
    def account_time(self) -> None:
        now = time.perf_counter()
        self.state.seconds[self.state.stage] = self.state.seconds.get(self.state.stage, 0) + now - self.clock
        self.clock = now

    def save(self, optimizer=None) -> None:
        """Atomically write the next checkpoint (keeping the previous one) and the metrics so far."""
        self.account_time()
        state = self.state
        state.saves += 1
        if not self.main_rank:
            return
        save_atomic({"identity": _identity(self.args), "settings": {k: getattr(self.args, k) for k in _STORED},
                     "state": state.__dict__, "model": self.model.state_dict(),
                     "optimizer": optimizer.state_dict() if optimizer is not None else None,
                     "rng": torch.get_rng_state()}, self.out / "checkpoints" / f"ckpt-{state.saves:07d}.pt")
        for old in _checkpoints(self.out)[:-2]:
            old.unlink()
        write_text_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.records))

    def next_stage(self, stage: str) -> None:
        self.account_time()  # the time so far belongs to the stage that ends
        state = self.state
        state.stage, state.epoch, state.batch, state.step, state.sums = stage, 0, 0, 0, None
        self.save()

    def train_stage(self, stage, opt, epochs, lr_of_epoch, after_step=None, stop=lambda: False, extra=dict) -> None:
        """The stage's epochs from where the state says, checkpointing every ``--checkpoint-every``
        steps, when ``after_step`` reports a phase change, and after each epoch."""
        args, state = self.args, self.state
        total = epochs * self.steps_per_epoch if epochs is not None else _max_regularization_iterations(args)
        trained = _ddp(self.model)
        with tqdm(total=total, initial=min(state.step, total), desc=stage, disable=self.quiet,
                  dynamic_ncols=True) as bar:
            def tick(next_batch, sums):  # after every step
                state.batch, state.sums = next_batch, sums
                state.step += 1
                changed = after_step() if after_step is not None else False
                bar.update()
                bar.set_postfix(loss=f"{sums['last_loss']:.3f}", acc=f"{100 * sums['last_acc']:.1f}",
                                **extra(), refresh=False)
                _fault_injection(stage, state.step)
                if changed or state.step % args.checkpoint_every == 0:
                    self.save(opt)
                return stop()

            while (epochs is None or state.epoch < epochs) and not stop():
                lr = lr_of_epoch(state.epoch)
                for g in opt.param_groups:
                    g["lr"] = lr
                sums = train_epoch(trained, self.data, opt, self.device, batch_size=args.batch_size, seed=args.seed,
                                   stage=stage, epoch=state.epoch, start_batch=state.batch, sums=state.sums,
                                   after_step=tick, max_skipped_in_a_row=args.max_skipped_steps)
                rec = {"type": "epoch", "stage": stage, "epoch": state.epoch, "lr": lr, **epoch_metrics(sums),
                       **evaluate(self.model, self.data, self.device), **extra()}
                state.records.append(rec)
                state.skipped_steps += sums["skipped"]
                bar.set_postfix(test_acc=f"{rec['test_acc']:.2f}", **extra())
                state.epoch, state.batch, state.sums = state.epoch + 1, 0, None
                self.save(opt)

    # ---- the stages ----
    def pretrain(self) -> None:
        """Train the dense model (cosine schedule), or load it from --checkpoint."""
        args = self.args
        if args.checkpoint is not None:
            _load_dense(self.model, args.checkpoint, self.device)
            self.state.epoch = args.pretrain_epochs
        opt = torch.optim.SGD(self.model.parameters(), lr=args.lr_pretrain, momentum=args.momentum,
                              weight_decay=args.weight_decay, nesterov=True)
        self._restore(opt)
        self.train_stage("pretrain", opt, args.pretrain_epochs,
                         lambda e: args.lr_pretrain * 0.5 * (1 + math.cos(math.pi * e / args.pretrain_epochs)))
        dense = self.state.results["dense"] = {**evaluate(self.model, self.data, self.device),
                                               **model_cost(self.model, self.example)}
        self.say(f"dense model: test accuracy {dense['test_acc']:.2f}%")
        self.next_stage("regularize")
        if self.plan.budget is None or not self.plan.budget.by_score:  # else GrowingReg allocates: shown then
            self.say(str(self.plan))

    def regularize(self) -> None:
        """Growing regularization until the schedule is done, then prune (compact when structured)."""
        args, state = self.args, self.state
        opt = torch.optim.SGD(self.model.parameters(), lr=args.lr_reg, momentum=args.momentum,
                              weight_decay=args.weight_decay)
        greg = GrowingReg(opt, self.plan, **_greg_kwargs(args), penalize=args.penalize, nan_guard=False)  # train_epoch guards every stage
        self._restore(greg)
        tracer = _Tracer(greg, args, state)
        self.train_stage("regularize", greg, None, lambda e: args.lr_reg, after_step=tracer.after_step,
                         stop=lambda: greg.done, extra=lambda: {"phase": greg.phase, "lam": f"{tracer.lam_max:.2e}"})
        masks = greg.masks()
        if self.plan.budget is not None and self.plan.budget.by_score:
            self.say(f"allocation chosen from the scores at the {'pick' if args.method == 'greg2' else 'start'}:\n"
                     f"{self.plan}")
        apply_masks(self.model, masks, self.plan)
        state.results["masks"] = {k: v.cpu() for k, v in masks.items()}
        state.results["regularization"] = {"iterations": greg.iteration, "lambda": greg.lambdas()}
        if self.main_rank:
            trace = plots.stack_trace(state.trace, tracer.meta(masks))
            torch.save(trace, self.out / "regularization.pt")
            if state.trace:
                plots.lambda_schedule(trace, self.out / "lambda_schedule.png")
                plots.score_distribution(trace, self.out / "score_distribution.png")
        if any(l.approximate for l in self.plan.pruned):  # the cut changes the function: say by how much
            batch = torch.stack([self.data.test[i][0] for i in range(min(64, len(self.data.test)))]).to(self.device)
            state.results["output_change"] = output_change(self.model, masks, self.plan, batch)
        if self.structured:  # remove the pruned groups for real: a smaller dense model from here on
            compact(self.model, masks, self.plan)
        state.results["pruned"] = evaluate(self.model, self.data, self.device)
        self.say(f"pruned ({args.method}), before fine-tuning: test accuracy {state.results['pruned']['test_acc']:.2f}%")
        self.next_stage("finetune")

    def finetune(self) -> None:
        """Train the compacted model, or (unstructured) the masked one with removed weights held at zero."""
        args = self.args
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr_ft[0][1], momentum=args.momentum,
                              weight_decay=args.weight_decay)
        self._restore(opt)
        masks = self._masks()
        self.train_stage("finetune", opt, args.finetune_epochs, lambda e: lr_at(self.lr_ft, e),
                         after_step=None if self.structured else lambda: apply_masks(self.model, masks, self.plan))
        self.state.results["final"] = {**evaluate(self.model, self.data, self.device),
                                       **model_cost(self.model, self.example)}
        self.next_stage("finished")

    def _masks(self) -> dict:
        return {k: v.to(self.device) for k, v in self.state.results["masks"].items()}

    def finish(self) -> dict:
        """Latency, summary, the model file (and sparse pack), the accuracy plot; the summary."""
        args, state, n_pruned = self.args, self.state, len(self.plan.pruned)
        if not self.main_rank:
            return _summary(args, state, self.plan.cost(), self.structured, n_pruned, latency=None)
        dense_arch = models.create(args.model, self.data.num_classes, in_channels=self.data.in_channels)  # widths only
        start = time.perf_counter()  # the measurements count in the wall time
        latency = None if args.no_latency else compare_latency(
            dense_arch, self.model, self.example, args.latency_batch_sizes, args.latency_seconds)
        budget = self.plan.budget
        timed = None
        if budget is not None and budget.target.kind == "latency":  # measured where it was planned: the run's device
            timed = measure_speedup(dense_arch.to(self.device).eval(), self.model.eval(), batch_inputs(
                self.example, budget.target.batch_size), seconds=2.0)
        state.seconds["latency"] = time.perf_counter() - start
        summary = _summary(args, state, self.plan.cost(), self.structured, n_pruned, latency)
        if budget is not None:
            summary["target"] = _target_summary(budget, summary, timed)
        summary["steps_per_epoch"] = self.steps_per_epoch
        if args.recipe is not None:  # the paper's figures beside this run's
            summary["recipe"] = {"name": args.recipe, "paper": RECIPES[args.recipe].paper}
        save_model(self.model, self.out / "model.pt", masks=None if self.structured else state.results["masks"])
        if not self.structured:  # unstructured: the kept weights in a compact format beside the dense file
            packed = pack_model(self.model, self._masks(), self.plan, "bitmap")
            save_atomic(packed, self.out / "sparse.pt")
            summary["sparse_bytes"] = {"dense": packed["bytes_dense"], "bitmap": packed["bytes_packed"]}
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        plots.accuracy(state.records, self.out / "accuracy.png", summary["dense"]["test_acc"])
        print(format_table(summary))
        return summary


def _load_dense(model, path, device) -> None:
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(f"--checkpoint {path}: cannot be read as a weights-only torch file: {err}") from err
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"--checkpoint {path}: expected a state_dict or {{'state_dict': ...}}")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(f"--checkpoint {path} does not match model {type(model).__name__}: {err}") from err


class _Tracer:
    """Samples λ of every layer and the scores of one layer during regularization, for the plots."""

    def __init__(self, greg: GrowingReg, args, state: RunState):
        self.greg, self.state = greg, state
        total = max(_max_regularization_iterations(args), 1)
        self.every = max(1, total // 400)
        structured = args.granularity != "weight"
        layers = greg.layers
        if layers:
            pick = (max(layers, key=lambda l: l.n_groups) if structured
                    else min(layers, key=lambda l: l.n_groups))
            self.layer = pick
            gen = torch.Generator().manual_seed(args.seed)
            n = pick.n_groups
            self.subset = torch.randperm(n, generator=gen)[:128].sort().values if n > 128 else torch.arange(n)
        else:
            self.layer = None
        self.lam_max = 0.0
        self.last_phase = state.phase_changes[-1][1] if state.phase_changes else None
        if not state.trace:  # a resumed run has its trace already
            self.sample()

    def sample(self) -> None:
        greg = self.greg
        if greg.phase != self.last_phase:
            self.state.phase_changes.append((greg.iteration, greg.phase))
            self.last_phase = greg.phase
        if self.layer is None:
            return
        lam = greg.lambdas()
        sel = [v[0] for v in lam.values()]
        self.lam_max = max(sel) if sel else 0.0
        self.state.trace.append({"iteration": greg.iteration, "lambda_selected": sel,
                                 "lambda_kept": [v[1] for v in lam.values()],
                                 "scores": greg.current_scores(self.layer.name)[self.subset.to(self.layer.weight.device)].cpu()})

    def after_step(self) -> bool:
        """Sample when due; True when the phase changed (a checkpoint is due too)."""
        changed = self.greg.phase != self.last_phase
        if self.greg.iteration % self.every == 0 or self.greg.done or changed:
            self.sample()
        return changed

    def meta(self, masks) -> dict:
        if self.layer is None:
            return {"layers": [], "phase_changes": self.state.phase_changes, "score_layer": None,
                    "score_kept": torch.zeros(0, dtype=torch.bool)}
        return {"layers": [l.name for l in self.greg.layers], "phase_changes": self.state.phase_changes,
                "score_layer": self.layer.name,
                "score_kept": masks[self.layer.name].reshape(-1).cpu()[self.subset]}


def model_cost(model, example) -> dict:
    """Parameters and FLOPs (``torch.utils.flop_counter``, one example)."""
    return {"params": sum(p.numel() for p in model.parameters()), "flops": count_flops(model, example)[1]}


def compare_latency(dense, pruned, example, batches=(1, 64), seconds=20.0, rounds=None) -> dict:
    """CPU inference latency of the dense and the pruned model (:func:`greg_fast.budget.measure_speedup`:
    timed in alternation), per batch size, in about ``seconds`` in all (or ``rounds`` rounds each)."""
    dense, pruned = copy.deepcopy(dense).cpu().eval(), copy.deepcopy(pruned).cpu().eval()
    x = example[0].cpu()
    return {f"batch{b}": measure_speedup(dense, pruned, (x.expand(b, *x.shape[1:]).contiguous(),),
                                         seconds=seconds / len(batches), rounds=rounds, warmup=2)
            for b in batches}


def _summary(args, state: RunState, cost: dict, structured: bool, n_pruned: int, latency: dict | None) -> dict:
    r = state.results
    dense, final = r["dense"], r["final"]
    # structured: measured on the compacted model; unstructured: the planned count of kept weights
    params = final["params"] if structured else cost["params_after"]
    flops = final["flops"] if structured else cost["flops_after"]
    latency = latency or {}
    lat = {f"latency_ms_{b}": {k: m[f"{k}_ms"] for k in ("dense", "pruned")} for b, m in latency.items()}
    largest = max(latency, key=lambda b: int(b.removeprefix("batch")), default=None)
    return {
        "model": args.model, "data": args.data, "method": args.method, "granularity": args.granularity,
        "coupled": _coupled(args), "penalize": args.penalize, "ratio": args.ratio, "stage_ratios": args.stage_ratios,
        "dense": {**{k: dense[k] for k in ("test_acc", "params", "flops")},
                  **{k: v["dense"] for k, v in lat.items()}},
        "pruned": {"test_acc_before_finetune": r["pruned"]["test_acc"], "test_acc": final["test_acc"],
                   "params": params, "flops": flops, "compacted": structured,
                   **{k: v["pruned"] for k, v in lat.items()}},
        "flops_reduction": dense["flops"] / max(flops, 1),
        "params_reduction": dense["params"] / max(params, 1),
        # median and 10th-90th percentile of per-round ratios, dense and pruned timed in alternation
        "speedup": {b: {k: m[k] for k in ("speedup", "speedup_p10_p90", "rounds")} for b, m in latency.items()},
        "speedup_largest_batch": largest,
        "regularization_iterations": r["regularization"]["iterations"],
        "skipped_steps": state.skipped_steps,
        "layers_pruned": n_pruned, "output_change": r.get("output_change"),
        "wall_time_s": {**{k: round(v, 2) for k, v in state.seconds.items()},
                        "total": round(sum(state.seconds.values()), 2)},
    }


def _target_summary(budget, summary: dict, timed: dict | None) -> dict:
    """The target against what was planned and what the pruned model measures (``timed``: dense
    and pruned at the latency target's batch size, alternating)."""
    t = budget.target
    measured = {"flops_kept": summary["pruned"]["flops"] / summary["dense"]["flops"],
                "params_kept": summary["pruned"]["params"] / summary["dense"]["params"]}
    if timed is not None:
        measured.update(latency_ms={"dense": timed["dense_ms"], "pruned": timed["pruned_ms"]})
        measured.update(latency_speedup=timed["speedup"], latency_speedup_p10_p90=timed["speedup_p10_p90"])
        met = timed["speedup_p10_p90"][1] >= 1 / t.keep  # within the noise band
    else:
        met = measured[f"{t.kind}_kept"] <= t.keep * (1 + 1e-9)
    planned = {k: v for k, v in budget.achieved.items() if k != "latency"}
    if "latency" in budget.achieved:
        lat = budget.achieved["latency"]
        planned.update(latency_speedup=lat["speedup"], latency_speedup_p10_p90=lat["speedup_p10_p90"])
    return {"kind": t.kind, "keep": t.keep, "speedup": 1 / t.keep, "batch_size": t.batch_size if timed else None,
            "allocation": budget.allocation, "max_ratio": budget.max_ratio, "round_to": budget.round_to,
            "text": str(t), "planned": planned, "measured": measured, "met": met}


def format_table(s: dict) -> str:
    unit = ("groups" + (", penalize group" if s.get("penalize") == "group" else "")) if s.get("coupled") \
        else s["granularity"]
    t = s.get("target")
    label = f"{s['method']} {unit} " + (f"ratio {s['ratio']}" if s["ratio"] is not None else
                                        f"stages {s['stage_ratios']}" if s["stage_ratios"] is not None else
                                        f"{t['allocation']} to {t['speedup']:.3g}x {t['kind']}")
    rows = [
        ("", "dense", f"pruned ({label})"),
        ("test accuracy (%)", f"{s['dense']['test_acc']:.2f}",
         f"{s['pruned']['test_acc']:.2f} (before fine-tune {s['pruned']['test_acc_before_finetune']:.2f})"),
        ("parameters", f"{s['dense']['params']:,}", f"{s['pruned']['params']:,} ({s['params_reduction']:.2f}x fewer)"),
        ("FLOPs", f"{s['dense']['flops']:,}", f"{s['pruned']['flops']:,} ({s['flops_reduction']:.2f}x fewer)"),
    ]
    for b, m in s["speedup"].items():
        note = ""
        if b == s["speedup_largest_batch"]:
            lo, hi = m["speedup_p10_p90"]
            note = (f" ({m['speedup']:.2f}x faster, {lo:.2f}-{hi:.2f} over {m['rounds']} rounds)"
                    if s["pruned"]["compacted"] else " (masks keep the dense kernels: no speed-up without a sparse runtime)")
        rows.append((f"CPU latency b{b.removeprefix('batch')} (ms)", f"{s['dense']['latency_ms_' + b]:.2f}",
                     f"{s['pruned']['latency_ms_' + b]:.2f}{note}"))
    if not s["speedup"]:
        rows.append(("CPU latency", "not measured (--no-latency)", ""))
    if s.get("output_change") is not None:  # --approximate: the compacted model differs from the masked one
        rows.append(("output change", "", f"{s['output_change']:.3g} (max |compacted - masked| / max |masked|)"))
    if t is not None:
        key = "latency_speedup" if t["kind"] == "latency" else f"{t['kind']}_kept"
        spread = lambda d: (f" ({d[key + '_p10_p90'][0]:.2f}-{d[key + '_p10_p90'][1]:.2f})"
                            if key + "_p10_p90" in d else "")
        fmt = "{:.2f}x faster" if t["kind"] == "latency" else "{:.4f} kept"
        rows.append(("target", t["text"], f"planned {fmt.format(t['planned'][key])}{spread(t['planned'])}, measured "
                     f"{fmt.format(t['measured'][key])}{spread(t['measured'])}: {'met' if t['met'] else 'NOT met'}"))
    w = s["wall_time_s"]
    rows.append(("wall time (s)", f"pretrain {w.get('pretrain', 0):.1f}",
                 f"regularize {w.get('regularize', 0):.1f} ({s['regularization_iterations']} it), "
                 f"fine-tune {w.get('finetune', 0):.1f}, latency {w.get('latency', 0):.1f}, total {w['total']:.1f}"))
    return table.format_table(rows)
