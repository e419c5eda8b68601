"""The ``greg-fast`` command: ``prune``, ``demo``, ``compare``, ``export``, ``recipes``, ``info`` and ``bench``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import torch

from . import __version__, compare, data, job, models
from .atomic import write_text_atomic
from .export import export_and_measure, format_latency
from .io import load as load_model
from .backend import ENV_VAR, auto_choice, backends
from .hyper import METHODS, Hyper
from . import bench
from .budget import ALLOCATIONS, DEFAULT_MAX_RATIO, target_from_args
from .units import PENALIZE
from .recipes import RECIPES, table as recipes_table
from .train import resolve_device
from .units import GRANULARITIES, HEADS

# The demo: digits, a CIFAR ResNet, GReg-1 at 0.5 on the prunable layers, a schedule shortened from
# the reference's (delta 1e-4 every 10 iterations up to 1, then 10k stabilize) to ~2 minutes on 2 cores.
DEMO_ARGS = ["--model", "resnet20", "--data", "digits", "--method", "greg1", "--granularity", "filter",
             "--ratio", "0.5", "--pretrain-epochs", "15", "--lr-pretrain", "0.05", "--batch-size", "64",
             "--lr-reg", "0.01", "--delta", "0.01", "--interval", "1", "--stabilize", "100",
             "--finetune-epochs", "10", "--lr-ft", "0:0.01,6:0.001"]


def _ratio_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.strip("[]").split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ratios") from err


# What a run needs, from the command line or from --recipe.
_REQUIRED = ("model", "data", "method", "finetune_epochs", "lr_ft", "out")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,64; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="the paper's settings for a model (see `greg-fast recipes`); explicit flags override them")
    p.add_argument("--model", choices=models.names())
    p.add_argument("--data", choices=data.DATASETS)
    p.add_argument("--data-dir", default=None,
                   help="folder of cifar10/cifar100 (the python version, or train/ and test/ or val/ image "
                        "folders) or imagefolder data")
    p.add_argument("--image-size", type=int, default=None, metavar="PIXELS",
                   help="resize the images to this (default: their own size; imagefolder of mixed sizes: 224)")
    for split in ("train", "test"):
        p.add_argument(f"--{split}-subset", type=int, default=None, metavar="N",
                       help=f"use N images of the {split} split, drawn at random once (the same in every run)")
    p.add_argument("--normalize", default=None, metavar="STATS",
                   help="'data' (the training split's statistics; the default, but for imagefolder), 'imagenet' "
                        "(imagefolder's default; what pretrained ImageNet weights expect) or 'M,M,M/S,S,S'")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--granularity", default="filter", choices=GRANULARITIES)
    p.add_argument("--coupled", action=argparse.BooleanOptionalAction, default=None,
                   help="prune coupled channel groups (residual streams, concats, depthwise and grouped convs, "
                        "gating) as units; default: on for filters with --ratio, off with --stage-ratios. "
                        "--no-coupled plans single layers as the 2021 reference does")
    p.add_argument("--approximate", action="store_true",
                   help="compact norms over channels (LayerNorm, GroupNorm) to torch's own over the kept channels and "
                        "also cut weight-standardized convs' inputs: the pruned model then differs from the masked "
                        "one; the summary gives the measured change")
    p.add_argument("--heads", default="dims", choices=HEADS,
                   help="attention: cut the same dims in every head (default), or whole heads")
    p.add_argument("--penalize", default="filters", choices=PENALIZE,
                   help="what a unit's penalty applies to: its filter rows (the paper's method) or "
                        "every parameter entry removed with it (default filters)")
    ratio = p.add_mutually_exclusive_group()
    ratio.add_argument("--ratio", type=float, help="pruning ratio of every prunable layer, in [0, 1)")
    ratio.add_argument("--stage-ratios", type=_ratio_list,
                       help="reference ResNet stage list 'stem,stage1,...,fc', e.g. 0,0.75,0.75,0.32,0")
    for kind, what in (("flops", "FLOPs"), ("params", "parameters"), ("latency", "latency (measured)")):
        ratio.add_argument(f"--target-{kind}", metavar="KEEP|Nx", default=None,
                           help=f"prune to a {what} budget instead of a ratio: the fraction kept (0.5) or a "
                                "speed-up (2x)")
    b = p.add_argument_group("budget (with --target-*)")
    b.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="how the budget is spread: uniform (one ratio, searched; the default) or global (channels "
                        "of all groups ranked by mean |w| relative to their group's mean)")
    b.add_argument("--max-ratio", type=float, default=None,
                   help=f"no group loses more than this share of its channels (default {DEFAULT_MAX_RATIO})")
    b.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="every group keeps a multiple of N channels, or all of them (also with --ratio)")
    b.add_argument("--latency-batch-size", type=int, default=64, metavar="B",
                   help="batch size at which --target-latency is measured (default 64)")
    p.add_argument("--skip", type=lambda text: text.split(","), default=None, metavar="GLOBS",
                   help="layers (names or globs, comma-separated) kept whole")
    s = p.add_argument_group("schedule (reference CIFAR defaults)")
    for f in dataclasses.fields(Hyper):
        s.add_argument("--" + f.name.replace("_", "-"), type=int if f.type == "int" else float, default=f.default,
                       help=f"{f.metadata['help']} (default {f.default:g})")
    s.add_argument("--lr-reg", type=float, default=1e-3, help="SGD lr while regularizing (default 1e-3)")
    t = p.add_argument_group("training")
    t.add_argument("--pretrain-epochs", type=int, default=0,
                   help="train the dense model this long first (from --checkpoint's weights where given)")
    t.add_argument("--checkpoint", default=None,
                   help="dense weights saved by any code: a state_dict, or a dict holding one under 'state_dict', "
                        "'model', ...; wrapper prefixes (module., _orig_mod.) are stripped and layers named "
                        "otherwise but of the same shapes in order are renamed (said on stderr)")
    t.add_argument("--lr-pretrain", type=float, default=0.1, help="peak lr of the cosine pretraining")
    t.add_argument("--finetune-epochs", type=int)
    t.add_argument("--lr-ft", help="fine-tune lr schedule 'epoch:lr,...', e.g. 0:0.01,60:0.001,90:1e-4")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    lat = p.add_argument_group("latency in the summary (CPU, dense and pruned timed in alternation)")
    lat.add_argument("--latency-batch-sizes", type=_int_list, default=[1, 64], metavar="B,B",
                     help="batch sizes timed (default 1,64)")
    lat.add_argument("--latency-seconds", type=float, default=20.0, metavar="S",
                     help="time budget of the whole measurement, split over the batch sizes; each takes at "
                          "least 5 rounds (default 20)")
    lat.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--export", choices=("onnx",), default=None,
                   help="at the end, write model.onnx (checked in ONNX Runtime; the export is tried on the dense "
                        "model before training) and time dense vs pruned in ONNX Runtime at --latency-batch-sizes "
                        "(summary.json: onnx)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run whose --out is DIR")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help="checkpoint interval in steps (also at every phase change and epoch end)")
    p.add_argument("--max-skipped-steps", type=int, default=100, metavar="N",
                   help="stop with an error after N steps in a row with non-finite gradients (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or plan table")


_RATIO_KINDS = ("ratio", "stage_ratios", "target_flops", "target_params", "target_latency")


def _prune_args(prune: argparse.ArgumentParser, argv, defaults=None, resumable=False) -> argparse.Namespace:
    """Parse ``greg-fast prune`` (or ``compare``): a recipe's settings (or ``defaults``, when
    neither --model nor --data is given) become the defaults, so that flags given explicitly
    override them; then everything a run needs must be there. With ``resumable``, ``--resume DIR``
    makes the run's stored flags the defaults (and DIR the --out): flags given with it override
    them, and the resume refuses those that must not change."""
    args = prune.parse_args(argv)
    settings = None
    if args.recipe is not None:
        settings = RECIPES[args.recipe].defaults()
    elif defaults is not None and args.model is None and args.data is None:
        settings = dict(defaults)
    if resumable and args.resume is not None:
        try:
            stored = job.stored_settings(args.resume)
        except (FileNotFoundError, ValueError) as err:
            prune.error(str(err))
        settings = {**(settings or {}), **stored, "out": args.resume}
    if settings is not None:
        if args.ratio is not None or args.stage_ratios is not None or target_from_args(args) is not None:
            for kind in _RATIO_KINDS:  # the user's replace the preset's (a resume then names the change)
                settings.pop(kind, None)
        prune.set_defaults(**settings)
        args = prune.parse_args(argv)
    missing = [f"--{k.replace('_', '-')}" for k in _REQUIRED if getattr(args, k) is None]
    if args.ratio is None and args.stage_ratios is None and not target_from_args(args) is not None:
        missing.append("--ratio, --stage-ratios or a --target-flops/--target-params/--target-latency")
    if args.checkpoint is None and args.pretrain_epochs <= 0:
        missing.append("--pretrain-epochs N (> 0) or --checkpoint FILE for the dense model")
    if missing and args.recipe is not None:
        prune.error(f"--recipe {args.recipe} sets the paper's settings; still give {'; '.join(missing)}")
    if missing:
        prune.error(f"missing {'; '.join(missing)} (or a --recipe that sets some of them: greg-fast recipes)")
    return args


def export_command(args) -> None:
    """``greg-fast export``: the model file of a run (a zoo model) as ONNX, with dense-vs-pruned latency in
    ONNX Runtime (the dense architecture is built afresh: its latency does not depend on its weights)."""
    path = Path(args.path)
    model_file = path / "model.pt" if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: no such file (give a greg-fast prune run's folder or its model.pt)")
    pruned = load_model(model_file)
    if getattr(pruned, "greg_arch", None) is None:
        raise ValueError(f"{model_file} holds a model greg_fast cannot build by itself: export it from Python with "
                         "greg_fast.export.export_onnx(model, path, example)")
    arch = pruned.greg_arch
    dense = models.create(arch["name"], arch["num_classes"], in_channels=arch["in_channels"])
    out = Path(args.out) if args.out else model_file.with_suffix(".onnx")
    result = export_and_measure(pruned, dense, torch.zeros(1, *pruned.greg_input_size), out, args.batch_sizes,
                                args.seconds)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=2))
    print(f"wrote {out} (ONNX Runtime equals PyTorch to {result['max_rel_diff']:.1e}) and {out.with_suffix('.json')}")
    print(format_latency(result))


def info() -> None:
    print(f"greg_fast   {__version__}")
    print(f"python      {platform.python_version()} ({sys.executable})")
    print(f"torch       {torch.__version__}")
    for mod in ("torchvision", "triton"):
        try:
            print(f"{mod:<12}{__import__(mod).__version__}")
        except ImportError:
            print(f"{mod:<12}not installed")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"device      cuda: {torch.cuda.get_device_name()}")
    else:
        device = torch.device("cpu")
        print(f"device      cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    print(f"backends    (auto on {device.type}: {auto_choice(device)}; {ENV_VAR} forces one)")
    for name, status in backends(device).items():
        print(f"  {name:<8}{status}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="greg-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"greg_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="pretrain/load -> regularize -> prune -> fine-tune -> evaluate")
    _add_prune_args(prune)
    demo = sub.add_parser("demo", help="the prune job on digits with a CIFAR ResNet, in ~2 minutes on CPU")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quiet", action="store_true")
    comp = sub.add_parser("compare", help="one-shot L1 vs GReg-1/GReg-2 from the same dense model, over seeds, "
                                          "under equal fine-tune budget and equal total steps")
    _add_prune_args(comp)
    comp.add_argument("--methods", type=compare.parse_methods, default="l1,greg1,greg2",
                      help="comma-separated: l1, greg1, greg2, greg1-group, greg2-group (-group: penalize='group')")
    comp.add_argument("--allocations", type=compare.parse_allocations, default=None, metavar="LIST",
                      help="with a --target-*: run every method under each allocation (e.g. uniform,global), "
                           "all at the same budget")
    comp.add_argument("--seeds", type=int, default=3, help="dense models (and runs of each method): seeds --seed .. --seed + N - 1")
    comp.set_defaults(method="l1", out="runs/compare")
    sub.add_parser("info", help="versions, device and available backends")
    sub.add_parser("recipes", help="the paper's settings (prune --recipe NAME) with its reported results")
    b = sub.add_parser("bench", help="time one regularization step per provider on ResNet conv weights (CPU set)")
    b.add_argument("--models", default=",".join(bench.MODELS),
                   help="zoo models; NAME-coupled plans coupled groups, NAME-coupled-group penalizes whole "
                        "groups (default %(default)s)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--out", default="bench/results", help="folder of the results JSON")
    ex = sub.add_parser("export", help="ONNX of a pruned model, checked in ONNX Runtime, and its latency there "
                                       "against the dense architecture's")
    ex.add_argument("path", help="a greg-fast prune run's folder, or a model.pt it wrote")
    ex.add_argument("--out", default=None, help="the ONNX file (default: model.onnx beside model.pt)")
    ex.add_argument("--batch-sizes", type=_int_list, default=[1, 8], metavar="B,B", help="timed (default 1,8)")
    ex.add_argument("--seconds", type=float, default=20.0, help="time budget of the measurement (default 20)")
    args = parser.parse_args(argv)

    if args.command == "info":
        info()
        return 0
    if args.command == "recipes":
        print(recipes_table())
        return 0
    if args.command == "bench":
        unknown = [m for m in args.models.split(",") if bench.zoo_name(m) not in models.names()]
        if unknown:
            parser.error(f"bench --models: unknown model(s) {', '.join(unknown)}; known: {', '.join(models.names())}")
        try:
            device = resolve_device(args.device)
        except ValueError as err:
            parser.error(str(err))
        records = bench.run_set(device, args.models.split(","), progress=lambda s: print("timing", s, file=sys.stderr))
        print(bench.table(records))
        print(f"wrote {bench.write_results(records, Path(args.out), device)}")
        return 0
    if args.command == "export":
        try:
            export_command(args)
        except (ValueError, RuntimeError, ImportError, FileNotFoundError) as err:
            print(f"greg-fast: error: {err}", file=sys.stderr)
            return 2
        return 0
    run = job.run
    if args.command == "demo":
        for old in Path(args.out, "checkpoints").glob("ckpt-*.pt"):  # a demo always starts afresh
            old.unlink()
        args = prune.parse_args(DEMO_ARGS + ["--out", args.out] + (["--quiet"] if args.quiet else []))
    elif args.command == "compare":
        args = _prune_args(comp, argv[argv.index("compare") + 1:], defaults=compare.DEFAULTS)
        run = compare.run
    else:
        args = _prune_args(prune, argv[argv.index("prune") + 1:], resumable=True)
    try:
        run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"greg-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngreg-fast: interrupted; the newest checkpoint in {args.out} continues the run with "
              f"--resume {args.out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
