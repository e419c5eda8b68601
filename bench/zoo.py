"""What a uniform ratio removes on the zoo, greg_fast (coupled groups, and single layers as the
2021 reference) next to Torch-Pruning's MetaPruner (L1 magnitude, classifier ignored) on the same
models in the same run; plan and compact times; a check that the compacted model is the masked one.

    pip install -e ".[bench]" && python bench/zoo.py [--ratio 0.5] [--size 224] [--models a,b]
    python bench/zoo.py --timm [--size 160]   # timm's convnets, built without weights

writes bench/results/zoo[-timm]-<device>-<date>.json and .md (the table, and what stays excluded and why).
timm models get random BatchNorm statistics and affine terms (as the tests do), so that a wrong cut
shows in "compacted == masked" (max relative difference, float64 copies, L1 picks).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import re
import resource
import signal
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

import greg_fast as gf
from greg_fast import bench, models, timing
from greg_fast.plan import count_flops
from greg_fast.table import format_table
from greg_fast.ties import tied_counts

ZOO = ("resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "vgg16_bn", "mobilenet_v2",
       "mobilenet_v3_large", "efficientnet_b0", "densenet121", "googlenet", "regnet_y_400mf", "convnext_tiny",
       "squeezenet1_0", "shufflenet_v2_x1_0", "resnet56", "vgg19_bn_cifar", "vit_b_16", "swin_t")
TIMM = ("efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100", "regnety_002", "densenet121",
        "inception_v3", "darknet53", "cspresnet50", "repvgg_a0", "resnetv2_50", "resnetv2_50x1_bit",
        "nf_resnet26", "vgg11_bn", "convnextv2_atto", "dpn68", "skresnet18", "mixnet_s", "ghostnet_100",
        "res2net50_14w_8s", "resnest14d", "xception41", "hrnet_w18_small", "resnet50d", "dla34")
# attention and norms over channels (issue 37), and the convnets whose widths their modules store
ATTENTION = ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto", "convnextv2_atto",
             "mobilevit_xxs", "levit_128s", "efficientformer_l1", "poolformer_s12", "mambaout_femto",
             "edgenext_xx_small", "res2net50_14w_8s", "mixnet_s", "dpn68", "cspresnet50", "skresnet18",
             "deit_tiny_distilled_patch16_224", "pvt_v2_b0", "coatnet_nano_rw_224", "maxvit_nano_rw_256",
             "tiny_vit_5m_224", "efficientvit_b0", "fastvit_t8", "caformer_s18", "repvit_m1")
INPUT = {"maxvit_nano_rw_256": 256}  # models built for another input size than --size
TORCH_PRUNING_LIMIT_S = 300
TORCH_PRUNING_MEMORY_GB = 8  # more address space than the run holds before it  # it runs for minutes on some channel-attention nets: past this, "no answer"


def removed(before: tuple[int, int], after: tuple[int, int]) -> tuple[float, float]:
    return tuple(100.0 * (1 - a / b) for a, b in zip(after, before))


def cost_of(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters()), count_flops(model, (x,))[1]


def greg_fast_row(model: nn.Module, x: torch.Tensor, ratio: float, coupled: bool,
                  approximate: bool = False) -> tuple[dict, gf.Plan]:
    model = copy.deepcopy(model).eval()
    start = time.perf_counter()
    plan = gf.plan(model, ratio, example_inputs=x, coupled=coupled, approximate=approximate)
    plan_s = time.perf_counter() - start
    c = plan.cost()
    row = {"params_removed": 100 * (1 - c["params_after"] / c["params_before"]),
           "flops_removed": 100 * (1 - c["flops_after"] / c["flops_before"]), "plan_s": plan_s,
           "groups": len(plan.pruned), "excluded": len(plan.excluded)}
    if coupled:  # L1 picks, then compaction: timed, and checked against the masked model
        masks = gf.GrowingReg(torch.optim.SGD(model.parameters(), lr=0.0), plan, method="l1").masks()
        row["max_rel_error"] = float64_change(model, masks, plan, x)
        row["random_mask_errors"] = [float64_change(model, random_masks(plan, r), plan, x) for r in (0.3, 0.7)]
        start = time.perf_counter()
        gf.compaction.compaction_error(model, masks, plan, (x,), exact=not approximate)
        row["verify_s"] = time.perf_counter() - start
        start = time.perf_counter()
        gf.compact(model, masks, plan, verify=False)
        row["compact_s"] = time.perf_counter() - start
        row["params_after_matches_plan"] = sum(p.numel() for p in model.parameters()) == c["params_after"]
        # measured on the compacted model: the plan counts layers' FLOPs, not attention's products
        row["flops_removed"] = 100 * (1 - count_flops(model, (x,))[1] / c["flops_before"])
    return row, plan


def random_masks(plan: gf.Plan, ratio: float) -> dict:
    """Each group loses ``ratio`` of its channels, drawn at random (tied groups: in their tie's proportion)."""
    g = torch.Generator().manual_seed(1)
    counts = tied_counts(plan.layers, plan.ties, {l.name: gf.n_prune_for(ratio, l.n_groups) for l in plan.layers})
    return {l.name: torch.randperm(l.n_groups, generator=g) >= counts[l.name] for l in plan.layers}


def float64_change(model: nn.Module, masks: dict, plan: gf.Plan, x: torch.Tensor) -> float:
    """``output_change`` on float64 copies: a random-init net amplifies float32 rounding."""
    model, plan = copy.deepcopy((model, plan))
    return gf.output_change(model.double(), masks, plan, x.double())


def why_excluded(plan: gf.Plan) -> Counter:
    """The plan's exclusions by kind: the emitting module's class and what its op does."""
    kinds = Counter()
    for reason in plan.excluded.values():
        reason = re.sub(r"^its filters are group '[^']*', excluded: ", "", reason)
        reason = re.sub(r"`[^`]*` \(([^)]*)\)", r"\1", reason)  # module paths vary, classes do not
        reason = re.sub(r"\b\d+\b", "N", reason.split(" (a trial compaction")[0].split(" (plan(")[0])
        kinds[reason[:200]] += 1
    return kinds


def write_report(out: str | Path, kind: str, meta: dict, rows: list[dict], header: str, table: str) -> Path:
    """``<out>/<kind>-<device>-<date>.json`` (meta and rows) and ``.md`` (``header``, then ``table``):
    the files of a bench that measures a list of models once. Returns the stem."""
    stem = Path(out) / f"{kind}-{timing.device_slug(torch.device('cpu'))}-{meta['date']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(header + table + "\n")
    return stem


def build(name: str, timm_zoo: bool) -> nn.Module:
    torch.manual_seed(0)
    if not timm_zoo and name in models.names():
        return models.create(name, 1000 if name in models._TORCHVISION else 10).eval()
    import timm
    import torchvision
    model = (timm.create_model(name, pretrained=False) if timm_zoo else getattr(torchvision.models, name)()).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random statistics and affine terms: a wrong cut shows
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.affine:
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        for p in model.parameters():  # layer scales start near 0: a branch would hide a wrong cut
            if p.dim() == 1 and p.numel() and float(p.abs().max()) < 1e-3:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _address_space() -> int:
    """Bytes of virtual memory this process holds (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()


class _NoAnswer(Exception):
    pass


def _alarm(signum, frame):
    raise _NoAnswer(f"no answer in {TORCH_PRUNING_LIMIT_S} s")


def torch_pruning_row(model: nn.Module, x: torch.Tensor, ratio: float, heads: str | None = None) -> dict:
    """Torch-Pruning's MetaPruner; ``heads`` ("dims", "whole") passes the head settings of its own
    ViT example for every module with a ``qkv`` projection and ``num_heads``."""
    import torch_pruning as tp
    model = copy.deepcopy(model).eval()
    before = cost_of(model, x)
    classifier = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    num_heads = {m.qkv: m.num_heads for m in model.modules()
                 if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)}
    if heads is not None and not num_heads:
        return {"skipped": "no module with a qkv projection and num_heads for its head settings"}
    settings = {} if heads is None else dict(num_heads=num_heads, prune_head_dims=True, prune_num_heads=heads == "whole",
                                             head_pruning_ratio=ratio if heads == "whole" else 0.0)
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TORCH_PRUNING_LIMIT_S)
    limits = resource.getrlimit(resource.RLIMIT_AS)  # it took 20 GiB on coatnet_nano: a MemoryError instead
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + (TORCH_PRUNING_MEMORY_GB << 30), limits[1]))
    try:
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[classifier], **settings)
        pruner.step()
        seconds = time.perf_counter() - start
        for m in model.modules() if heads is not None else ():  # as its ViT example does after the step
            if getattr(m, "qkv", None) in num_heads:
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                if hasattr(m, "attn_dim"):
                    m.attn_dim = m.num_heads * m.head_dim
        params, flops = removed(before, cost_of(model, x))
    except Exception as err:  # report it, as the table does
        return {"error": f"{type(err).__name__}: {str(err)[:120]}"}
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return {"params_removed": params, "flops_removed": flops, "seconds": seconds}


def _tp(row: dict | None) -> str:
    return "-" if row is None or "skipped" in row else "fails" if "error" in row else f"{row['flops_removed']:.1f}%"


def attention_table(rows: list[dict]) -> str:
    """FLOPs removed by the default (exact) plan and by approximate=True next to Torch-Pruning's plain
    and head settings; the largest compacted-vs-masked change over L1 picks and random masks."""
    table = [("model", "FLOPs removed: default (exact)", "approximate=True", "Torch-Pruning", "TP head dims",
              "TP whole heads", "params removed", "groups", "excluded", "plan s", "compacted == masked (max)")]
    for r in rows:
        c, a, heads = r["coupled"], r.get("approximate"), r.get("torch_pruning_heads", {})
        error = max([c["max_rel_error"], *c.get("random_mask_errors", [])])
        table.append((r["model"], f"{c['flops_removed']:.1f}%",
                      f"{a['flops_removed']:.1f}% (changes {a['max_rel_error']:.2g})" if a else "-",
                      _tp(r["torch_pruning"]), _tp(heads.get("dims")), _tp(heads.get("whole")),
                      f"{c['params_removed']:.1f}%", str(c["groups"]), str(c["excluded"]), f"{c['plan_s']:.1f}",
                      f"{error:.0e}" + ("" if c["params_after_matches_plan"] else " (params differ!)")))
    return format_table(table, right=tuple(range(1, 11)))


def write_results(rows: list[dict], args, zoo: tuple, device: torch.device, out: Path, stem: str) -> str:
    """The table of ``rows``, written with them to ``out/stem``.md and .json (after every model: a run
    stopped midway keeps what it measured)."""
    rows.sort(key=lambda r: zoo.index(r["model"]) if r["model"] in zoo else len(zoo))
    meta = {"ratio": args.ratio, "device": timing.device_name(device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}
    try:
        import torch_pruning
        meta["torch_pruning"] = getattr(torch_pruning, "__version__", "?")
    except ImportError:
        pass
    table = [("model", "FLOPs removed: coupled", "layers only", "Torch-Pruning", "params removed: coupled",
              "Torch-Pruning", "groups", "excluded", "plan s", "compact s", "verify s", "Torch-Pruning s",
              "compacted == masked")]
    for r in rows:
        c, lay, tp_ = r["coupled"], r["layers"], r["torch_pruning"]
        tp_flops = f"{tp_['flops_removed']:.1f}%" if "error" not in tp_ else "fails"
        tp_params = f"{tp_['params_removed']:.1f}%" if "error" not in tp_ else "-"
        table.append((r["model"], f"{c['flops_removed']:.1f}%",
                      f"{lay['flops_removed']:.1f}%", tp_flops,
                      f"{c['params_removed']:.1f}%", tp_params, str(c["groups"]), str(c["excluded"]),
                      f"{c['plan_s']:.1f}", f"{c['compact_s']:.2f}", f"{c.get('verify_s', 0):.2f}",
                      f"{tp_['seconds']:.1f}" if "error" not in tp_ else "-",
                      f"{c['max_rel_error']:.0e}" + ("" if c["params_after_matches_plan"] else " (params differ!)")))
    text = attention_table(rows) if args.attention else format_table(table, right=tuple(range(1, 13)))
    failures = [f"- {r['model']}: {r['torch_pruning']['error']}" for r in rows if "error" in r["torch_pruning"]]
    if failures:
        text += "\n\nTorch-Pruning fails on:\n" + "\n".join(failures)
    text += "\n\nWhat stays excluded (groups, by the module class and op that stop them):\n"
    for r in rows:
        text += f"- {r['model']}: " + "; ".join(f"{n} x {why}" for why, n in r.get("excluded", [])) + "\n"
    for r in rows:
        if "approximate" in r:
            a = r["approximate"]
            text += (f"\n{r['model']} with approximate=True (groups whose cut is approximate cut too): {a['flops_removed']:.1f}% FLOPs, "
                     f"{a['params_removed']:.1f}% params removed; compacted vs masked output differs by "
                     f"{a['max_rel_error']:.2g} (relative, L1 picks on an untrained model)")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (f"{'timm' if args.timm else 'torchvision'} models, uniform ratio {args.ratio}, inputs "
              f"{args.size}x{args.size} (CIFAR models 32x32), FLOPs by "
              f"torch.utils.flop_counter; {meta['device']}, torch {meta['torch']}, Torch-Pruning "
              f"{meta.get('torch_pruning', '-')}, {meta['date']}.\n\n")
    (out / f"{stem}.md").write_text(header + text + "\n")
    return text


def main(argv=None) -> int:
    global TORCH_PRUNING_LIMIT_S
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--size", type=int, default=None,
                   help="input size of the ImageNet models (default 224, timm's 160; CIFAR ones: 32)")
    p.add_argument("--timm", action="store_true", help="timm's convnets (pip install timm) instead of torchvision's")
    p.add_argument("--attention", action="store_true",
                   help="timm's attention, hybrid and norm-over-channels models and the convnets whose modules "
                        "store their widths (default size 224)")
    p.add_argument("--models", default=None, help="comma-separated names (default: the whole list)")
    p.add_argument("--tp-limit", type=int, default=TORCH_PRUNING_LIMIT_S,
                   help=f"seconds Torch-Pruning gets per run before it counts as no answer (default {TORCH_PRUNING_LIMIT_S})")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    TORCH_PRUNING_LIMIT_S = args.tp_limit
    args.timm = args.timm or args.attention
    zoo = ATTENTION if args.attention else TIMM if args.timm else ZOO
    args.models = args.models or ",".join(zoo)
    args.size = args.size or (160 if args.timm and not args.attention else 224)
    device = torch.device("cpu")
    kind = "-attention" if args.attention else "-timm" if args.timm else ""
    stem = f"zoo{kind}-{timing.device_slug(device)}-{datetime.date.today().isoformat()}"
    out = Path(args.out)
    earlier = out / f"{stem}.json"  # a run on some models updates today's table
    rows = json.loads(earlier.read_text())["rows"] if earlier.exists() else []
    for name in args.models.split(","):
        model = build(name, args.timm)
        size = INPUT.get(name, args.size if args.timm or name not in models.names() or name in models._TORCHVISION else 32)
        x = torch.randn(1, 3, size, size)
        coupled, plan = greg_fast_row(model, x, args.ratio, True)
        row = {"model": name, "input": size, "coupled": coupled, "layers": greg_fast_row(model, x, args.ratio, False)[0],
               "excluded": why_excluded(plan).most_common()}
        if any("approximate=True" in reason for reason in plan.excluded.values()):
            row["approximate"] = greg_fast_row(model, x, args.ratio, True, approximate=True)[0]
        if args.attention and "approximate" not in row:  # what approximate=True (torch's own norms) gives
            row["approximate"] = greg_fast_row(model, x, args.ratio, True, approximate=True)[0]
        try:
            row["torch_pruning"] = torch_pruning_row(model, x, args.ratio)
            if args.attention:
                row["torch_pruning_heads"] = {h: torch_pruning_row(model, x, args.ratio, h) for h in ("dims", "whole")}
        except ImportError:
            row["torch_pruning"] = {"error": "Torch-Pruning not installed (pip install -e '.[bench]')"}
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if r["model"] != name] + [row]
        text = write_results(rows, args, zoo, device, out, stem)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
