"""Pruning to a budget on the zoo: the per-group ratios that uniform and global allocation choose at
one FLOPs target, and the latency of the compacted model with and without ``round_to``, measured in
the same run (dense and pruned timed in alternation: median speed-up and its 10th-90th percentile).

    python bench/budget.py [--target 2x] [--size 160] [--batch 8] [--round-to 8,16] [--models a,timm/b]

Models are built without weights (nothing can be downloaded): on random weights a global allocation
ranks noise, so its ratios here show the mechanism and the caps, not what it picks on a trained
model (the digits compare in the README does that). Writes bench/results/budget-<device>-<date>.json,
.md and .png (the per-group ratios of each allocation, for the first models).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from zoo import build  # noqa: E402

import greg_fast as gf  # noqa: E402
from greg_fast import bench, timing  # noqa: E402
from greg_fast import budget as budgets  # noqa: E402
from greg_fast.plan import count_flops  # noqa: E402
from greg_fast.slices import plan_scores  # noqa: E402
from greg_fast.table import format_table  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf", "densenet121",
          "timm/resnet50d", "timm/mobilenetv3_large_100", "timm/regnety_002", "timm/ghostnet_100", "timm/dla34",
          "timm/darknet53")


def run_model(name: str, target: str, size: int, batch: int, round_tos: list[int | None], seconds: float) -> list[dict]:
    timm_zoo = name.startswith("timm/")
    model = build(name.removeprefix("timm/"), timm_zoo)
    x = torch.randn(1, 3, size, size)
    inputs = budgets.batch_inputs((x,), batch)
    flops_before = count_flops(model, (x,))[1]
    rows = []
    for allocation in ("uniform", "global"):
        for round_to in round_tos:
            start = time.perf_counter()
            plan = gf.plan(model, target={"flops": target}, allocation=allocation, round_to=round_to, example_inputs=x)
            plan_s = time.perf_counter() - start
            scores = plan_scores(plan, plan.layers)
            masks = budgets.selection(plan.layers, {l.name: l.n_prune for l in plan.layers}, scores)
            small, small_plan = copy.deepcopy((model, plan))
            gf.compact(small.eval(), masks, small_plan)  # verify=True: compacted == masked
            flops_after = count_flops(small, (x,))[1]
            timed = budgets.measure_speedup(model, small, inputs, seconds)
            ratios = [l.n_prune / l.n_groups for l in plan.layers]
            rows.append({
                "model": name, "allocation": allocation, "round_to": round_to, "plan_s": plan_s,
                "groups": len(plan.layers), "pruned": len(plan.pruned),
                "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
                "ratios": {l.name: round(l.n_prune / l.n_groups, 4) for l in plan.layers},
                "kept_widths": {l.name: l.n_groups - l.n_prune for l in plan.layers},
                "flops_kept_planned": plan.budget.achieved["flops_kept"],
                "flops_kept_measured": flops_after / flops_before,
                "params_kept": plan.budget.achieved["params_kept"],
                "speedup": timed["speedup"], "speedup_p10_p90": timed["speedup_p10_p90"],
                "dense_ms": timed["dense_ms"], "pruned_ms": timed["pruned_ms"], "rounds": timed["rounds"]})
            print(f"{name} {allocation} round_to={round_to}: {timed['speedup']:.2f}x", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    head = ("model", "allocation", "round_to", "groups cut", "ratio min / median / max", "FLOPs kept (planned = measured)",
            "params kept", "CPU speed-up (p10-p90)")
    body = [(r["model"], r["allocation"], str(r["round_to"] or "-"), f"{r['pruned']}/{r['groups']}",
             f"{r['ratio_min']:.2f} / {r['ratio_median']:.2f} / {r['ratio_max']:.2f}",
             f"{r['flops_kept_planned']:.4f}" + ("" if abs(r["flops_kept_planned"] - r["flops_kept_measured"]) < 1e-3
                                                 else f" (measured {r['flops_kept_measured']:.4f})"),
             f"{r['params_kept']:.3f}",
             f"{r['speedup']:.2f}x ({r['speedup_p10_p90'][0]:.2f}-{r['speedup_p10_p90'][1]:.2f})") for r in rows]
    return format_table([head, *body], right=(2, 3, 5, 6, 7))


def plot(rows: list[dict], path: Path, names: list[str]) -> None:
    """Per-group ratio of each allocation (no rounding), one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        for i, allocation in enumerate(("uniform", "global")):
            r = next(r for r in rows if r["model"] == name and r["allocation"] == allocation and not r["round_to"])
            values = list(r["ratios"].values())
            ax.bar([j + 0.4 * i for j in range(len(values))], values, width=0.4,
                   label=f"{allocation} ({r['speedup']:.2f}x CPU)")
        ax.set(title=f"{name}: per-group ratio at the same FLOPs target", ylabel="ratio", xlabel="group (plan order)",
               ylim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="2x", help="FLOPs target (fraction kept or speed-up)")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch", type=int, default=8, help="batch size of the latency measurement")
    p.add_argument("--round-to", default="8,16", help="comma-separated round_to values measured besides none")
    p.add_argument("--seconds", type=float, default=3.0, help="timing budget per measurement")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    round_tos = [None] + [int(v) for v in args.round_to.split(",") if v]
    names = args.models.split(",")
    rows = []
    for name in names:
        rows += run_model(name, args.target, args.size, args.batch, round_tos, args.seconds)
    device = torch.device("cpu")
    slug = "".join(c if c.isalnum() else "-" for c in timing.device_name(device)).strip("-").lower()
    stem = f"budget-{slug}-{datetime.date.today().isoformat()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"target_flops": args.target, "size": args.size, "batch": args.batch, "device": timing.device_name(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = table(rows)
    (out / f"{stem}.md").write_text(
        f"FLOPs target {args.target}, {args.size}x{args.size}, latency at batch {args.batch} on {meta['device']}, "
        f"torch {meta['torch']}, {meta['date']}; random weights.\n\n{text}\n")
    plot(rows, out / f"{stem}.png", names[:3])
    print(text)
    print(f"wrote {out / stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
