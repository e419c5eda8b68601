"""One ``greg-fast prune`` run, stage by stage: set-up (and resume), pretrain, regularize (and prune),
fine-tune, finish (latency, summary, files). :class:`Run` and :func:`run` are the job's public
interface (``greg-fast compare`` runs its jobs through them)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from .. import data as datasets
from .. import models, plots
from ..atomic import save_atomic, write_text_atomic
from ..budget import batch_inputs, measure_speedup, parse_target, target_from_args
from ..compaction import compact, output_change
from ..engine import GrowingReg
from ..export import check_exportable, export_and_measure, format_latency
from ..io import save as save_model
from ..weights import load_weights
from ..masks import apply_masks
from ..plan import plan as make_plan, stage_ratios
from ..recipes import RECIPES
from ..sparse import pack_model
from ..train import evaluate, lr_at, n_batches, parse_lr_schedule, resolve_device
from . import report
from .checkpoints import RunState, checkpoints, load_latest
from .loop import Tracer, init_distributed, train_stage
from .settings import BUDGET_FLAGS, STORED, check_args, coupled, greg_kwargs, identity, settings_diff


def run(args) -> dict:
    """Run (or resume) the whole job; returns the summary."""
    job = Run(args)
    for stage, step in (("pretrain", job.pretrain), ("regularize", job.regularize), ("finetune", job.finetune)):
        if job.state.stage == stage:
            step()
    return job.finish()


def _check_image_size(args, model: torch.nn.Module, example: torch.Tensor) -> None:
    """Refuse a model that shrinks the data's images to 1x1 before convolutions with larger kernels
    (an ImageNet network on 8x8 digits), naming an --image-size at which it does not."""
    collapsed = models.collapsed_convs(model, (example,))
    if not collapsed:
        return
    h, w = example.shape[2:]
    fits = next((f for f in (2, 4, 8, 16, 32)
                 if not models.collapsed_convs(model, (example.new_zeros(1, example.shape[1], h * f, w * f),))), None)
    raise ValueError(f"--model {args.model} shrinks the {h}x{w} images of --data {args.data} to 1x1 before "
                     f"{len(collapsed)} of its convolutions with kernels over 1x1 (from `{collapsed[0]}` on): they "
                     "would see mostly padding. Use " + (f"--image-size {max(h, w) * fits} or more, or " if fits else "")
                     + "a model made for this image size (the CIFAR ResNets for 32x32 or smaller)")


class Run:
    """One ``greg-fast prune`` run: set-up (and resume) here, then one method per stage. ``state``
    (a :class:`RunState`) is all that a checkpoint holds besides tensors."""

    def __init__(self, args):
        check_args(args)
        self.args, self.out = args, Path(args.out)
        if args.resume is None and checkpoints(self.out):
            raise FileExistsError(f"{self.out} holds checkpoints of a run: pass --resume {self.out} to continue "
                                  "it, or choose another --out")
        self.lr_ft = parse_lr_schedule(args.lr_ft)
        self.data = datasets.subset(datasets.load(args.data, args.data_dir, image_size=args.image_size,
                                                  normalize=args.normalize), args.train_subset, args.test_subset)
        self.device, rank = init_distributed(resolve_device(args.device))
        self.main_rank = rank == 0
        torch.manual_seed(args.seed)
        self.model = models.create(args.model, self.data.num_classes, in_channels=self.data.in_channels).to(self.device)
        if args.checkpoint is not None and args.resume is None:  # before anything is planned or trained
            for note in load_weights(self.model, args.checkpoint, map_location=self.device,
                                     what=f"--checkpoint {args.checkpoint}"):
                if rank == 0:
                    print(f"greg-fast: --checkpoint: {note}", file=sys.stderr)
        self.example = (self.data.train[0][0].unsqueeze(0).to(self.device),)
        _check_image_size(args, self.model, self.example[0])
        self.structured = args.granularity != "weight"
        if getattr(args, "export", None) == "onnx" and self.main_rank:  # a failing export refused before training
            check_exportable(self.model, self.example[0])
        self.state = RunState()
        self.checkpoint = load_latest(self.out, self.device) if args.resume is not None else None
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
        kwargs = dict(granularity=args.granularity, coupled=coupled(args), approximate=args.approximate, heads=args.heads,
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
        saved = {"coupled": False, "approximate": False, "heads": "dims", "image_size": None, "normalize": None,
                 "train_subset": None, "test_subset": None,
                 "penalize": "filters", **{k: None for k in BUDGET_FLAGS}, "latency_batch_size": 64,
                 **self.checkpoint["identity"]}
        diff = settings_diff(saved, identity(self.args))
        if diff:
            raise ValueError(f"--resume {self.out}: the run was started with other settings: {diff}")
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
        save_atomic({"identity": identity(self.args), "settings": {k: getattr(self.args, k) for k in STORED},
                     "state": state.__dict__, "model": self.model.state_dict(),
                     "optimizer": optimizer.state_dict() if optimizer is not None else None,
                     "rng": torch.get_rng_state()}, self.out / "checkpoints" / f"ckpt-{state.saves:07d}.pt")
        for old in checkpoints(self.out)[:-2]:
            old.unlink()
        write_text_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.records))

    def next_stage(self, stage: str) -> None:
        self.account_time()  # the time so far belongs to the stage that ends
        state = self.state
        state.stage, state.epoch, state.batch, state.step, state.sums = stage, 0, 0, 0, None
        self.save()

    # ---- the stages ----
    def pretrain(self) -> None:
        """Train the dense model (cosine schedule; from --checkpoint's weights where given, which the
        set-up loaded), for --pretrain-epochs (none: the checkpoint as it is)."""
        args = self.args
        opt = torch.optim.SGD(self.model.parameters(), lr=args.lr_pretrain, momentum=args.momentum,
                              weight_decay=args.weight_decay, nesterov=True)
        self._restore(opt)
        train_stage(self, "pretrain", opt, args.pretrain_epochs,
                         lambda e: args.lr_pretrain * 0.5 * (1 + math.cos(math.pi * e / args.pretrain_epochs)))
        dense = self.state.results["dense"] = {**evaluate(self.model, self.data, self.device),
                                               **report.model_cost(self.model, self.example)}
        self.say(f"dense model: test accuracy {dense['test_acc']:.2f}%")
        self.next_stage("regularize")
        if self.plan.budget is None or not self.plan.budget.by_score:  # else GrowingReg allocates: shown then
            self.say(str(self.plan))

    def regularize(self) -> None:
        """Growing regularization until the schedule is done, then prune (compact when structured)."""
        args, state = self.args, self.state
        opt = torch.optim.SGD(self.model.parameters(), lr=args.lr_reg, momentum=args.momentum,
                              weight_decay=args.weight_decay)
        greg = GrowingReg(opt, self.plan, **greg_kwargs(args), penalize=args.penalize, nan_guard=False)  # train_epoch guards every stage
        self._restore(greg)
        tracer = Tracer(greg, args, state)
        train_stage(self, "regularize", greg, None, lambda e: args.lr_reg, after_step=tracer.after_step,
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
        train_stage(self, "finetune", opt, args.finetune_epochs, lambda e: lr_at(self.lr_ft, e),
                         after_step=None if self.structured else lambda: apply_masks(self.model, masks, self.plan))
        self.state.results["final"] = {**evaluate(self.model, self.data, self.device),
                                       **report.model_cost(self.model, self.example)}
        self.next_stage("finished")

    def _masks(self) -> dict:
        return {k: v.to(self.device) for k, v in self.state.results["masks"].items()}

    def finish(self) -> dict:
        """Latency, summary, the model file (and sparse pack), the accuracy plot; the summary."""
        args, state, n_pruned = self.args, self.state, len(self.plan.pruned)
        if not self.main_rank:
            return report.summary(args, state, self.plan.cost(), self.structured, n_pruned, latency=None)
        dense_arch = models.create(args.model, self.data.num_classes, in_channels=self.data.in_channels)  # widths only
        start = time.perf_counter()  # the measurements count in the wall time
        latency = None if args.no_latency else report.compare_latency(
            dense_arch, self.model, self.example, args.latency_batch_sizes, args.latency_seconds)
        budget = self.plan.budget
        timed = None
        if budget is not None and budget.target.kind == "latency":  # measured where it was planned: the run's device
            timed = measure_speedup(dense_arch.to(self.device).eval(), self.model.eval(), batch_inputs(
                self.example, budget.target.batch_size), seconds=2.0)
        state.seconds["latency"] = time.perf_counter() - start
        summary = report.summary(args, state, self.plan.cost(), self.structured, n_pruned, latency)
        if budget is not None:
            summary["target"] = report.target_summary(budget, summary, timed)
        summary["steps_per_epoch"] = self.steps_per_epoch
        if args.recipe is not None:  # the paper's figures beside this run's
            summary["recipe"] = {"name": args.recipe, "paper": RECIPES[args.recipe].paper}
        self.model.greg_input_size = tuple(self.example[0].shape[1:])  # what it was trained on (export's input)
        save_model(self.model, self.out / "model.pt", masks=None if self.structured else state.results["masks"])
        if not self.structured:  # unstructured: the kept weights in a compact format beside the dense file
            packed = pack_model(self.model, self._masks(), self.plan, "bitmap")
            save_atomic(packed, self.out / "sparse.pt")
            summary["sparse_bytes"] = {"dense": packed["bytes_dense"], "bitmap": packed["bytes_packed"]}
        if getattr(args, "export", None) == "onnx":
            summary["onnx"] = export_and_measure(self.model, dense_arch, self.example[0].cpu(), self.out / "model.onnx",
                                                 args.latency_batch_sizes, args.latency_seconds)
            self.say(format_latency(summary["onnx"]))
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        plots.accuracy(state.records, self.out / "accuracy.png", summary["dense"]["test_acc"])
        print(report.format_table(summary))
        return summary
