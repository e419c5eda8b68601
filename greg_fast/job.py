"""The ``greg-fast prune`` job: pretrain (or load) -> regularize -> prune -> fine-tune -> evaluate.

Writes to ``out``: ``metrics.jsonl`` (one record per epoch and per trace point), ``summary.json``,
``model.pt`` (``torch.load(..., weights_only=True)``), ``regularization.pt`` (λ and score traces),
``lambda_schedule.png``, ``score_distribution.png``, ``accuracy.png`` and ``checkpoint.pt``
(written atomically after every epoch; ``--resume`` continues from it).
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as datasets
from . import models, plots
from .compaction import compact
from .eager import apply_masks, group_scores
from .io import save as save_model
from .sparse import pack_model
from .engine import GrowingReg
from .plan import plan as make_plan, stage_ratios
from .train import epoch_generator, evaluate, lr_at, n_batches, parse_lr_schedule, train_epoch

STAGES = ("pretrain", "regularize", "finetune", "finished")
# Arguments that must agree between a run and its resume.
_RUN_IDENTITY = ("model", "data", "method", "granularity", "ratio", "stage_ratios", "delta", "interval",
                 "ceiling", "stabilize", "pick_delta", "pick_ceiling", "recover", "mag_ratio_limit",
                 "pretrain_epochs", "checkpoint", "finetune_epochs", "lr_ft", "lr_pretrain", "lr_reg",
                 "momentum", "weight_decay", "batch_size", "seed")


@dataclass
class RunState:
    """Everything a resumed run needs besides model and optimizer tensors."""
    stage: str = "pretrain"
    epoch: int = 0                       # next epoch to run within the stage
    records: list = field(default_factory=list)
    trace: list = field(default_factory=list)
    phase_changes: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _identity(args) -> dict:
    return {k: getattr(args, k) for k in _RUN_IDENTITY}


def _max_regularization_iterations(args) -> int:
    """Steps until ``done`` if only the ceiling stops growth (the magnitude ratio can stop it earlier)."""
    if args.method == "l1":
        return 0
    picks = math.ceil(args.pick_ceiling / args.pick_delta - 1e-9) if args.method == "greg2" else 0
    start = picks * args.pick_delta if args.method == "greg2" else 0.0
    grows = math.floor((args.ceiling - start) / args.delta + 1e-9) + 1
    return (picks + grows - 1) * args.interval + args.stabilize + 1


def run(args) -> dict:
    out = Path(args.out)
    if args.resume is not None and Path(args.resume) != out:
        raise ValueError("--resume DIR must be the run's --out DIR")
    ckpt_path = out / "checkpoint.pt"
    if args.resume is None and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume {out} to continue that run, "
                              "or choose another --out")
    ratio_err = None
    if (args.ratio is None) == (args.stage_ratios is None):
        ratio_err = "give exactly one of --ratio and --stage-ratios"
    if ratio_err:
        raise ValueError(ratio_err)
    lr_ft = parse_lr_schedule(args.lr_ft)
    data = datasets.load(args.data, args.data_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model = models.create(args.model, data.num_classes, in_channels=data.in_channels).to(device)
    example = (data.train[0][0].unsqueeze(0).to(device),)
    ratios = stage_ratios(model, args.stage_ratios) if args.stage_ratios is not None else None
    the_plan = make_plan(model, args.ratio or 0.0, granularity=args.granularity, ratios=ratios,
                         example_inputs=example)
    planned_cost = the_plan.cost()  # before compaction changes the planned modules
    structured = args.granularity != "weight"
    state = RunState()
    checkpoint = None
    if args.resume is not None:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume {out}: no checkpoint.pt there")
        checkpoint = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = checkpoint["identity"]
        diff = {k: (saved.get(k), v) for k, v in _identity(args).items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"--resume {out}: the run was started with other settings: "
                             + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items()))
        state = RunState(**checkpoint["state"])
        if state.stage in ("finetune", "finished") and structured:  # the checkpoint holds the small model
            compact(model, state.results["masks"], the_plan)
        model.load_state_dict(checkpoint["model"])
        torch.set_rng_state(checkpoint["rng"])
    out.mkdir(parents=True, exist_ok=True)
    quiet = args.quiet
    say = (lambda *a: None) if quiet else print

    def save(optimizer=None):
        _save_atomic({"identity": _identity(args), "state": state.__dict__, "model": model.state_dict(),
                      "optimizer": optimizer.state_dict() if optimizer is not None else None,
                      "rng": torch.get_rng_state()}, ckpt_path)
        with open(out / "metrics.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in state.records)

    def log_epoch(stage, epoch, train_metrics, lr, **extra):
        rec = {"type": "epoch", "stage": stage, "epoch": epoch, "lr": lr, **train_metrics,
               **evaluate(model, data, device), **extra}
        state.records.append(rec)
        return rec

    def run_epochs(stage, opt, epochs, lr_of_epoch, after_step=None):
        """Epochs ``state.epoch..epochs-1`` of a plain training stage, checkpointing after each."""
        t0 = time.perf_counter()
        with tqdm(total=epochs * steps_per_epoch, initial=state.epoch * steps_per_epoch, desc=stage,
                  disable=quiet, dynamic_ncols=True) as bar:
            for epoch in range(state.epoch, epochs):
                lr = lr_of_epoch(epoch)
                for g in opt.param_groups:
                    g["lr"] = lr

                def tick(loss, acc):
                    if after_step is not None:
                        after_step()
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * acc:.1f}", refresh=False)

                m = train_epoch(model, data, opt, device, batch_size=args.batch_size,
                                generator=epoch_generator(args.seed, stage, epoch), after_step=tick)
                rec = log_epoch(stage, epoch, m, lr)
                bar.set_postfix(loss=f"{m['train_loss']:.3f}", test_acc=f"{rec['test_acc']:.2f}")
                state.epoch = epoch + 1
                state.seconds[stage] = state.seconds.get(stage, 0) + time.perf_counter() - t0
                t0 = time.perf_counter()
                save(opt)

    steps_per_epoch = n_batches(data.train, args.batch_size)

    # ---- pretrain (or load) ----
    if state.stage == "pretrain":
        if args.checkpoint is not None:
            _load_dense(model, args.checkpoint, device)
            state.epoch = args.pretrain_epochs
        opt = torch.optim.SGD(model.parameters(), lr=args.lr_pretrain, momentum=args.momentum,
                              weight_decay=args.weight_decay, nesterov=True)
        if checkpoint is not None and checkpoint["optimizer"] is not None:
            opt.load_state_dict(checkpoint["optimizer"])
        run_epochs("pretrain", opt, args.pretrain_epochs,
                   lambda e: args.lr_pretrain * 0.5 * (1 + math.cos(math.pi * e / args.pretrain_epochs)))
        t0 = time.perf_counter()
        state.results["dense"] = {**evaluate(model, data, device), **measure(model, example)}
        state.seconds["pretrain"] = state.seconds.get("pretrain", 0) + time.perf_counter() - t0
        state.stage, state.epoch = "regularize", 0
        checkpoint = None
        save()
        say(f"dense model: test accuracy {state.results['dense']['test_acc']:.2f}%")

    if state.stage == "regularize" and state.epoch == 0 and not quiet:
        print(the_plan)

    # ---- regularize, then prune ----
    if state.stage == "regularize":
        t0 = time.perf_counter()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr_reg, momentum=args.momentum,
                              weight_decay=args.weight_decay)
        greg = GrowingReg(opt, the_plan, method=args.method, delta=args.delta, interval=args.interval,
                          ceiling=args.ceiling, stabilize=args.stabilize, pick_delta=args.pick_delta,
                          pick_ceiling=args.pick_ceiling, recover=args.recover,
                          mag_ratio_limit=args.mag_ratio_limit)
        if checkpoint is not None and checkpoint["optimizer"] is not None:
            greg.load_state_dict(checkpoint["optimizer"])
        tracer = _Tracer(greg, args, state)
        total = _max_regularization_iterations(args)
        with tqdm(total=total, initial=min(greg.iteration, total), desc="regularize", disable=quiet,
                  dynamic_ncols=True) as bar:
            epoch = state.epoch
            while not greg.done:
                def tick(loss, acc):
                    tracer.after_step()
                    bar.update()
                    if greg.iteration % 10 == 0 or greg.done:
                        bar.set_postfix(phase=greg.phase, lam=f"{tracer.lam_max:.2e}", loss=f"{loss:.3f}",
                                        acc=f"{100 * acc:.1f}", refresh=False)
                    return greg.done

                m = train_epoch(model, data, greg, device, batch_size=args.batch_size,
                                generator=epoch_generator(args.seed, "regularize", epoch), after_step=tick)
                log_epoch("regularize", epoch, m, args.lr_reg, iteration=greg.iteration, phase=greg.phase,
                          lambda_max=tracer.lam_max)
                epoch += 1
                state.epoch = epoch
                state.seconds["regularize"] = state.seconds.get("regularize", 0) + time.perf_counter() - t0
                t0 = time.perf_counter()
                save(greg)
        masks = greg.masks()
        apply_masks(model, masks, the_plan)
        state.results["masks"] = {k: v.cpu() for k, v in masks.items()}
        state.results["regularization"] = {"iterations": greg.iteration, "lambda": greg.lambdas()}
        state.results["pruned"] = evaluate(model, data, device)
        trace = plots.stack_trace(state.trace, tracer.meta(masks))
        torch.save(trace, out / "regularization.pt")
        if state.trace:
            plots.lambda_schedule(trace, out / "lambda_schedule.png")
            plots.score_distribution(trace, out / "score_distribution.png")
        if structured:  # remove the pruned groups for real: a smaller dense model from here on
            compact(model, masks, the_plan)
        state.seconds["regularize"] = state.seconds.get("regularize", 0) + time.perf_counter() - t0
        state.stage, state.epoch = "finetune", 0
        checkpoint = None
        save()
        say(f"pruned ({args.method}), before fine-tuning: test accuracy "
            f"{state.results['pruned']['test_acc']:.2f}%")

    # ---- fine-tune with the removed groups held at zero ----
    masks = {k: v.to(device) for k, v in state.results["masks"].items()}
    if state.stage == "finetune":
        opt = torch.optim.SGD(model.parameters(), lr=lr_ft[0][1], momentum=args.momentum,
                              weight_decay=args.weight_decay)
        if checkpoint is not None and checkpoint["optimizer"] is not None:
            opt.load_state_dict(checkpoint["optimizer"])
        # unstructured: the removed weights are held at zero after every step
        run_epochs("finetune", opt, args.finetune_epochs, lambda e: lr_at(lr_ft, e),
                   after_step=None if structured else lambda: apply_masks(model, masks, the_plan))
        t0 = time.perf_counter()
        state.results["final"] = {**evaluate(model, data, device), **measure(model, example)}
        state.seconds["finetune"] = state.seconds.get("finetune", 0) + time.perf_counter() - t0
        state.stage = "finished"
        save()

    summary = _summary(args, state, planned_cost, structured, len(the_plan.pruned))
    save_model(model, out / "model.pt", masks=None if structured else state.results["masks"])
    if not structured:  # unstructured: the kept weights in a compact format beside the dense file
        packed = pack_model(model, masks, the_plan, "bitmap")
        torch.save(packed, out / "sparse.pt")
        summary["sparse_bytes"] = {"dense": packed["bytes_dense"], "bitmap": packed["bytes_packed"]}
    with open(out / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    plots.accuracy(state.records, out / "accuracy.png", summary["dense"]["test_acc"])
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
                                 "scores": group_scores(self.layer)[self.subset.to(self.layer.weight.device)].cpu()})

    def after_step(self) -> None:
        if self.greg.iteration % self.every == 0 or self.greg.done or self.greg.phase != self.last_phase:
            self.sample()

    def meta(self, masks) -> dict:
        if self.layer is None:
            return {"layers": [], "phase_changes": self.state.phase_changes, "score_layer": None,
                    "score_kept": torch.zeros(0, dtype=torch.bool)}
        return {"layers": [l.name for l in self.greg.layers], "phase_changes": self.state.phase_changes,
                "score_layer": self.layer.name,
                "score_kept": masks[self.layer.name].reshape(-1).cpu()[self.subset]}


def measure(model, example, batches=(1, 64), repeats=15) -> dict:
    """Parameters, FLOPs (torch.utils.flop_counter, one example) and median CPU inference latency."""
    from torch.utils.flop_counter import FlopCounterMode
    model_cpu = copy.deepcopy(model).cpu().eval()
    x = example[0].cpu()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model_cpu(x)
    out = {"params": sum(p.numel() for p in model_cpu.parameters()), "flops": counter.get_total_flops()}
    with torch.no_grad():
        for b in batches:
            xb = x.expand(b, *x.shape[1:]).contiguous()
            times = []
            for i in range(repeats + 2):
                t = time.perf_counter()
                model_cpu(xb)
                if i >= 2:
                    times.append(time.perf_counter() - t)
            out[f"latency_ms_batch{b}"] = 1e3 * statistics.median(times)
    return out


def _summary(args, state: RunState, cost: dict, structured: bool, n_pruned: int) -> dict:
    r = state.results
    dense, final = r["dense"], r["final"]
    # structured: measured on the compacted model; unstructured: the planned count of kept weights
    params = final["params"] if structured else cost["params_after"]
    flops = final["flops"] if structured else cost["flops_after"]
    return {
        "model": args.model, "data": args.data, "method": args.method, "granularity": args.granularity,
        "ratio": args.ratio, "stage_ratios": args.stage_ratios,
        "dense": {k: dense[k] for k in ("test_acc", "params", "flops", "latency_ms_batch1", "latency_ms_batch64")},
        "pruned": {"test_acc_before_finetune": r["pruned"]["test_acc"], "test_acc": final["test_acc"],
                   "params": params, "flops": flops, "compacted": structured,
                   "latency_ms_batch1": final["latency_ms_batch1"],
                   "latency_ms_batch64": final["latency_ms_batch64"]},
        "flops_reduction": dense["flops"] / max(flops, 1),
        "params_reduction": dense["params"] / max(params, 1),
        "speedup_batch64": dense["latency_ms_batch64"] / final["latency_ms_batch64"],
        "regularization_iterations": r["regularization"]["iterations"],
        "layers_pruned": n_pruned,
        "wall_time_s": {**{k: round(v, 2) for k, v in state.seconds.items()},
                        "total": round(sum(state.seconds.values()), 2)},
    }


def format_table(s: dict) -> str:
    label = f"{s['method']} {s['granularity']} " + (f"ratio {s['ratio']}" if s["ratio"] is not None
                                                    else f"stages {s['stage_ratios']}")
    rows = [
        ("", "dense", f"pruned ({label})"),
        ("test accuracy (%)", f"{s['dense']['test_acc']:.2f}",
         f"{s['pruned']['test_acc']:.2f} (before fine-tune {s['pruned']['test_acc_before_finetune']:.2f})"),
        ("parameters", f"{s['dense']['params']:,}", f"{s['pruned']['params']:,} ({s['params_reduction']:.2f}x fewer)"),
        ("FLOPs", f"{s['dense']['flops']:,}", f"{s['pruned']['flops']:,} ({s['flops_reduction']:.2f}x fewer)"),
        ("CPU latency b1 (ms)", f"{s['dense']['latency_ms_batch1']:.2f}", f"{s['pruned']['latency_ms_batch1']:.2f}"),
        ("CPU latency b64 (ms)", f"{s['dense']['latency_ms_batch64']:.2f}",
         f"{s['pruned']['latency_ms_batch64']:.2f} ({s['speedup_batch64']:.2f}x faster)"),
    ]
    w = s["wall_time_s"]
    rows.append(("wall time (s)", f"pretrain {w.get('pretrain', 0):.1f}",
                 f"regularize {w.get('regularize', 0):.1f} ({s['regularization_iterations']} it), "
                 f"fine-tune {w.get('finetune', 0):.1f}, total {w['total']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)
