"""``greg-fast compare``: the same dense model pruned by several methods, over seeds, under two
protocols, as a table, a plot and ``compare.json``.

Per seed, one dense model (pretrained with that seed, or ``--checkpoint`` for all seeds), then each
method as a ``greg-fast prune`` job from those dense weights, each in a folder of its own under
``--out`` (so a killed compare continues where it was: finished jobs are read back from their
summary.json, an unfinished one resumes from its checkpoints). Protocols:

- **equal fine-tune budget** (the paper's): every method fine-tunes ``--finetune-epochs``;
- **equal total steps**: one-shot L1 also gets the longest regularization phase of the compared
  methods (that seed, rounded up to whole epochs) as extra fine-tuning, its learning-rate
  milestones stretched in proportion, so that no method wins by training longer.

A method is ``l1``, ``greg1`` or ``greg2``, optionally with ``-group`` (``penalize="group"``: every
parameter entry a unit's cut removes is penalized, BatchNorm and the consumers' columns included).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from . import job, plots
from .atomic import save_atomic, write_text_atomic
from .budget import ALLOCATIONS, target_from_args
from .hyper import METHODS
from .table import format_table
from .train import parse_lr_schedule

GROUP = "-group"
AT = "@"  # method@allocation: one method under one way of spreading a budget
PROTOCOLS = ("equal fine-tune", "equal total steps")
SETTINGS_FILE = "settings.json"

# The default run (digits, ResNet-20, the demo's schedule): see README "Does it work?" for why this ratio.
DEFAULTS = dict(model="resnet20", data="digits", ratio=0.7, pretrain_epochs=15, lr_pretrain=0.05, batch_size=64,
                lr_reg=0.01, delta=0.01, interval=1, stabilize=100, pick_delta=1e-3, pick_ceiling=1e-2,
                finetune_epochs=4, lr_ft="0:0.01,3:0.001", seeds=5,
                methods=["l1", "greg1", "greg2", "greg1-group"])


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m.removesuffix(GROUP) not in METHODS or m == "l1" + GROUP]
    if bad or not methods:
        raise argparse.ArgumentTypeError(
            f"--methods: unknown {', '.join(bad) or 'empty list'}; each is one of {', '.join(METHODS)}, "
            f"greg1{GROUP} or greg2{GROUP}")
    if len(set(methods)) != len(methods):
        raise argparse.ArgumentTypeError(f"--methods lists a method twice: {text}")
    return methods


def parse_allocations(text: str) -> list[str]:
    allocations = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in allocations if a not in ALLOCATIONS]
    if bad or not allocations or len(set(allocations)) != len(allocations):
        raise argparse.ArgumentTypeError(f"--allocations: expected distinct entries of {', '.join(ALLOCATIONS)}, "
                                         f"got {text!r}")
    return allocations


def stretch_lr_schedule(text: str, epochs: int, new_epochs: int) -> str:
    """The fine-tune schedule ``text`` over ``epochs`` stretched to ``new_epochs`` (milestones scaled)."""
    steps = parse_lr_schedule(text)
    scale = new_epochs / max(epochs, 1)
    return ",".join(f"{round(e * scale)}:{lr:g}" for e, lr in steps)


def _identity(args) -> dict:
    # the jobs measure no latency; a seed's runs do not depend on how many seeds there are, so a
    # folder run again with more or fewer --seeds reads the finished ones back
    skip = {"out", "quiet", "resume", "device", "recipe", "method", "penalize", "checkpoint_every",
            "latency_batch_sizes", "latency_seconds", "no_latency", "seeds"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


class Compare:
    """One compare run in ``args.out``: the jobs, run or read back, then the report."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.methods = parse_methods(args.methods) if isinstance(args.methods, str) else list(args.methods)
        args.methods = self.methods
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        allocations = getattr(args, "allocations", None)
        if allocations is not None:
            if args.allocation is not None:
                raise ValueError("give --allocation or --allocations, not both")
            if target_from_args(args) is None:
                raise ValueError("--allocations compares ways of spreading a budget: it needs --target-flops, "
                                 "--target-params or --target-latency")
        # each allocation runs every method; labels carry the allocation when there are several
        self.allocations = list(allocations) if allocations else [args.allocation]
        self.groups = [[m if len(self.allocations) == 1 else f"{m}{AT}{a}" for m in self.methods]
                       for a in self.allocations]
        self.variants = [v for group in self.groups for v in group]
        for variant in self.variants:  # every method's flags, before anything runs
            job.check_args(self._job_args(variant, 0, self.out / "check", args.finetune_epochs, args.lr_ft))
        settings = self.out / SETTINGS_FILE
        identity = json.loads(json.dumps(_identity(args)))
        if settings.exists():
            saved = json.loads(settings.read_text())
            diff = job.settings_diff(saved, identity)
            if diff:
                raise ValueError(f"{self.out} holds a compare run with other settings: {diff}; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(settings, json.dumps(identity, indent=1))

    # ---- the jobs ----
    def _job_args(self, method: str, seed: int, out: Path, finetune_epochs: int, lr_ft: str | None, dense=None):
        """A ``greg-fast prune`` job's arguments: this compare's, for one method, seed and folder."""
        a = copy.copy(self.args)
        method, _, allocation = method.partition(AT)
        a.method, a.penalize = method.removesuffix(GROUP), "group" if method.endswith(GROUP) else "filters"
        a.allocation = allocation or a.allocation
        a.seed, a.out, a.finetune_epochs, a.quiet = seed, str(out), finetune_epochs, True
        a.no_latency = True  # the report compares accuracy at equal budgets: no job spends time on latency
        a.lr_ft = lr_ft or a.lr_ft
        a.resume = str(out) if job.checkpoints(out) else None  # a killed job continues
        if dense is not None:
            a.checkpoint, a.pretrain_epochs = str(dense), 0
        return a

    def _dense(self, seed: int, bar) -> tuple[Path, float]:
        """Seed ``seed``'s dense weights (pretrained once, from --checkpoint where given, or --checkpoint as
        it is without --pretrain-epochs) and the pretraining seconds."""
        if self.args.checkpoint is not None and not self.args.pretrain_epochs:
            return Path(self.args.checkpoint), 0.0
        folder = self.out / f"seed{seed}" / "dense"
        path, info = folder / "dense.pt", folder / "dense.json"
        if path.exists() and info.exists():
            return path, json.loads(info.read_text())["seconds"]
        bar.set_postfix_str(f"seed {seed}: pretraining")
        dense = job.Run(self._job_args("l1", seed, folder, self.args.finetune_epochs, None))
        if dense.state.stage == "pretrain":
            dense.pretrain()  # checkpointed like any job: a killed pretraining resumes
        seconds = dense.state.seconds.get("pretrain", 0.0)
        save_atomic(dense.model.state_dict(), path)
        write_text_atomic(info, json.dumps({"seconds": seconds}))
        return path, seconds

    def _job(self, name: str, method: str, seed: int, dense: Path, epochs: int, lr_ft: str | None, bar) -> dict:
        out = self.out / f"seed{seed}" / name
        summary = out / "summary.json"
        if not summary.exists():
            bar.set_postfix_str(f"seed {seed}: {name}")
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "log.txt", "a") as log, contextlib.redirect_stdout(log):  # its summary table
                job.run(self._job_args(method, seed, out, epochs, lr_ft, dense=dense))
        return json.loads(summary.read_text())

    def run(self) -> dict:
        args = self.args
        has_l1 = "l1" in self.methods
        regularized = len(self.methods) - has_l1
        per_seed = 1 + len(self.variants) + (len(self.groups) if has_l1 and regularized else 0)
        records = []
        with tqdm(total=args.seeds * per_seed, desc="compare", dynamic_ncols=True, disable=args.quiet) as bar:
            for seed in range(args.seed, args.seed + args.seeds):
                dense, pretrain_s = self._dense(seed, bar)
                bar.update()
                for group in self.groups:
                    records += self._group(group, seed, dense, pretrain_s, bar)
        return self.report(records)

    def _group(self, variants: list[str], seed: int, dense: Path, pretrain_s: float, bar) -> list[dict]:
        """One allocation's methods from one dense model, under both protocols."""
        args, records, done = self.args, [], {}
        l1 = next((v for v in variants if v.partition(AT)[0] == "l1"), None)
        regularized = [v for v in variants if v != l1]
        for variant in regularized + ([l1] if l1 else []):
            done[variant] = self._job(variant, variant, seed, dense, args.finetune_epochs, None, bar)
            bar.update()
            for protocol in PROTOCOLS if variant != l1 or not regularized else PROTOCOLS[:1]:
                records.append(_record(done[variant], seed, variant, protocol, pretrain_s))
        if l1 and regularized:  # equal total steps: L1 fine-tunes as long as the longest regularization
            steps = max(done[m]["regularization_iterations"] for m in regularized)
            extra = math.ceil(steps / done[regularized[0]]["steps_per_epoch"])
            epochs = args.finetune_epochs + extra
            lr_ft = stretch_lr_schedule(args.lr_ft, args.finetune_epochs, epochs)
            summary = self._job(l1.replace("l1", "l1-total-steps", 1), l1, seed, dense, epochs, lr_ft, bar)
            bar.update()
            records.append(_record(summary, seed, l1, PROTOCOLS[1], pretrain_s, extra_finetune_epochs=extra))
        return records

    # ---- the report ----
    def report(self, records: list[dict]) -> dict:
        rows = aggregate(records, self.variants)
        per_seed = [r for r in records if r["method"] == self.variants[0] and r["protocol"] == PROTOCOLS[0]]
        dense = [r["dense_test_acc"] for r in per_seed]
        result = {"settings": _identity(self.args), "dense_test_acc": dense, "rows": rows, "runs": records}
        write_text_atomic(self.out / "compare.json", json.dumps(result, indent=1))
        text = table(rows, dense, [r["seconds"]["pretrain"] for r in per_seed])
        write_text_atomic(self.out / "compare.md", text + "\n")
        plots.compare(records, self.variants, PROTOCOLS, self.out / "compare.png", dense)
        print(text)
        print(f"wrote {self.out / 'compare.json'}, {self.out / 'compare.md'}, {self.out / 'compare.png'}")
        return result


def _record(summary: dict, seed: int, method: str, protocol: str, pretrain_s: float, **extra) -> dict:
    pruned, wall = summary["pruned"], summary["wall_time_s"]
    return {"seed": seed, "method": method, "protocol": protocol, "dense_test_acc": summary["dense"]["test_acc"],
            "test_acc": pruned["test_acc"], "test_acc_after_pruning": pruned["test_acc_before_finetune"],
            "params": pruned["params"], "flops": pruned["flops"],
            "params_reduction": summary["params_reduction"], "flops_reduction": summary["flops_reduction"],
            "regularization_iterations": summary["regularization_iterations"],
            "seconds": {"pretrain": pretrain_s, "regularize": wall.get("regularize", 0.0),
                        "finetune": wall.get("finetune", 0.0)}, **extra}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value: one seed has no spread)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _spread(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def aggregate(records: list[dict], methods: list[str]) -> list[dict]:
    """Mean and standard deviation over seeds, per protocol and method."""
    rows = []
    for protocol in PROTOCOLS:
        for method in methods:
            runs = [r for r in records if r["protocol"] == protocol and r["method"] == method]
            if not runs:
                continue
            row = {"protocol": protocol, "method": method, "seeds": len(runs)}
            for key in ("test_acc", "test_acc_after_pruning", "params", "flops", "flops_reduction"):
                row[key], row[key + "_std"] = _mean_std([r[key] for r in runs])
            for phase in ("regularize", "finetune"):
                row[f"{phase}_s"] = statistics.fmean(r["seconds"][phase] for r in runs)
            row["extra_finetune_epochs"] = max((r.get("extra_finetune_epochs", 0) for r in runs), default=0)
            rows.append(row)
    return rows


def table(rows: list[dict], dense_acc: list[float], pretrain_s: list[float]) -> str:
    head = ("protocol", "method", "test acc %", "right after pruning %", "params", "FLOPs", "FLOPs x fewer",
            "regularize s", "fine-tune s")
    body = [(r["protocol"] + (f" (+{r['extra_finetune_epochs']} ft epochs)" if r["extra_finetune_epochs"] else ""),
             r["method"], _spread(r["test_acc"], r["test_acc_std"]),
             _spread(r["test_acc_after_pruning"], r["test_acc_after_pruning_std"]),
             f"{r['params'] / 1e3:.1f}k", f"{r['flops'] / 1e6:.2f}M", f"{r['flops_reduction']:.2f}",
             f"{r['regularize_s']:.1f}", f"{r['finetune_s']:.1f}") for r in rows]
    over = (f"test accuracy mean ± std over {len(dense_acc)} seeds" if len(dense_acc) > 1
            else "one seed, so no spread (--seeds N > 1 gives the standard deviation)")
    return (f"{format_table([head, *body])}\ndense model {_spread(*_mean_std(dense_acc))}% (pretraining "
            f"{statistics.fmean(pretrain_s):.1f} s per seed); {over}")


def run(args) -> dict:
    return Compare(args).run()
