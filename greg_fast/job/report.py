"""The job's report: cost, latency, the summary written to summary.json and the table printed."""
from __future__ import annotations

import copy

from .. import table
from ..budget import measure_speedup
from ..plan import count_flops
from .checkpoints import RunState
from .settings import coupled


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


def summary(args, state: RunState, cost: dict, structured: bool, n_pruned: int, latency: dict | None) -> dict:
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
        "coupled": coupled(args), "penalize": args.penalize, "ratio": args.ratio, "stage_ratios": args.stage_ratios,
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


def target_summary(budget, summary: dict, timed: dict | None) -> dict:
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
    unit = ("groups" if s.get("coupled") else s["granularity"]) + (
        ", penalize group" if s.get("penalize") == "group" else "")
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
