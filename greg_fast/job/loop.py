"""The job's epoch loop: the stage's epochs from where the run's state says, checkpointing as it goes,
under torch.distributed when launched by torchrun; and the tracer of λ and scores for the plots."""
from __future__ import annotations

import os
import signal

import torch
from tqdm.auto import tqdm

from ..engine import GrowingReg
from ..train import epoch_metrics, evaluate, train_epoch
from .checkpoints import RunState
from .settings import max_regularization_iterations


def init_distributed(device: torch.device) -> tuple[torch.device, int]:
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


def ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The model to train: wrapped in DistributedDataParallel under torch.distributed (wrapped anew
    for each stage, since compaction replaces parameters)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def fault_injection(stage: str, step: int) -> None:
    """Test hook: GREG_FAST_KILL_AT=stage:step kills this process (SIGKILL) after that step."""
    target = os.environ.get("GREG_FAST_KILL_AT")
    if target and target == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def train_stage(job, stage, opt, epochs, lr_of_epoch, after_step=None, stop=lambda: False, extra=dict) -> None:
    """The stage's epochs from where the state says, checkpointing every ``--checkpoint-every``
    steps, when ``after_step`` reports a phase change, and after each epoch."""
    args, state = job.args, job.state
    total = epochs * job.steps_per_epoch if epochs is not None else max_regularization_iterations(args)
    trained = ddp(job.model)
    with tqdm(total=total, initial=min(state.step, total), desc=stage, disable=job.quiet,
              dynamic_ncols=True) as bar:
        def tick(next_batch, sums):  # after every step
            state.batch, state.sums = next_batch, sums
            state.step += 1
            changed = after_step() if after_step is not None else False
            bar.update()
            bar.set_postfix(loss=f"{sums['last_loss']:.3f}", acc=f"{100 * sums['last_acc']:.1f}",
                            **extra(), refresh=False)
            fault_injection(stage, state.step)
            if changed or state.step % args.checkpoint_every == 0:
                job.save(opt)
            return stop()

        while (epochs is None or state.epoch < epochs) and not stop():
            lr = lr_of_epoch(state.epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            sums = train_epoch(trained, job.data, opt, job.device, batch_size=args.batch_size, seed=args.seed,
                               stage=stage, epoch=state.epoch, start_batch=state.batch, sums=state.sums,
                               after_step=tick, max_skipped_in_a_row=args.max_skipped_steps)
            rec = {"type": "epoch", "stage": stage, "epoch": state.epoch, "lr": lr, **epoch_metrics(sums),
                   **evaluate(job.model, job.data, job.device), **extra()}
            state.records.append(rec)
            state.skipped_steps += sums["skipped"]
            bar.set_postfix(test_acc=f"{rec['test_acc']:.2f}", **extra())
            state.epoch, state.batch, state.sums = state.epoch + 1, 0, None
            job.save(opt)


class Tracer:
    """Samples λ of every layer and the scores of one layer during regularization, for the plots."""

    def __init__(self, greg: GrowingReg, args, state: RunState):
        self.greg, self.state = greg, state
        total = max(max_regularization_iterations(args), 1)
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
