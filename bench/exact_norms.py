"""What the exact norms cost: a compacted model whose LayerNorms (and GRN means, attention scales)
keep the masked model's count, against the same compacted architecture with torch's own norms
(``approximate=True``), timed in turns in one run (PyTorch eager, and ONNX Runtime after
``torch.onnx.export``); and that the exported exact model computes what the PyTorch one does.

    pip install onnx onnxruntime onnxscript && python bench/exact_norms.py [--models a,b] [--batch 8]

writes bench/results/exact-norms-<device>-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import tempfile
from pathlib import Path

import torch

import greg_fast as gf
from greg_fast import timing
from greg_fast.export import export_onnx, onnx_speedup
from greg_fast.table import format_table

from zoo import build, write_report


def compacted_pair(name: str, size: int):
    """The model compacted with L1 picks at ratio 0.5 twice: exact norms, and torch's own."""
    model = build(name, True)
    x = torch.randn(1, 3, size, size)
    out = {}
    for approximate in (False, True):
        m = copy.deepcopy(model)
        plan = gf.plan(m, 0.5, example_inputs=x, approximate=approximate)
        if not out:
            masks = gf.GrowingReg(torch.optim.SGD(m.parameters(), lr=0.0), plan, method="l1").masks()
        gf.compact(m, masks, plan, verify=not approximate)
        out["approximate" if approximate else "exact"] = m.eval()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="convnext_atto,vit_tiny_patch16_224,convnextv2_atto,poolformer_s12")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seconds", type=float, default=10.0, help="ONNX Runtime timing budget per model")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    cpu = torch.device("cpu")
    rows = []
    for name in args.models.split(","):
        pair = compacted_pair(name, args.size)
        x = torch.randn(args.batch, 3, args.size, args.size)
        with torch.no_grad():
            calls = {k: (lambda m=m: m(x)) for k, m in pair.items()}
            seconds = timing.alternate(calls, args.rounds, cpu)
        row = {"model": name, "torch_ratio": timing.ratio_spread(seconds["exact"], seconds["approximate"]),
               "torch_exact_ms": 1e3 * sorted(seconds["exact"])[len(seconds["exact"]) // 2]}
        try:
            with tempfile.TemporaryDirectory() as tmp:  # each export checked against PyTorch at this batch
                checked = {k: export_onnx(m, Path(tmp) / f"{k}.onnx", x, batch_sizes=(args.batch,)) for k, m in pair.items()}
                timed = onnx_speedup(checked["exact"]["path"], checked["approximate"]["path"], x, (args.batch,),
                                     seconds=args.seconds)[f"batch{args.batch}"]
            row.update(ort_ratio=[timed["speedup"], timed["speedup_p10_p90"]],
                       onnx_max_rel_diff=checked["exact"]["max_rel_diff"])
        except ImportError as err:
            row["onnx"] = f"not measured: {err}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"device": timing.device_name(cpu), "torch": torch.__version__, "batch": args.batch, "size": args.size,
            "date": datetime.date.today().isoformat()}
    table = [("model", "PyTorch: exact / torch's norms (median [p10, p90])", "ONNX Runtime: exact / torch's norms",
              "ONNX exact vs PyTorch exact (max rel)")]
    for r in rows:
        fmt = lambda rs: f"{rs[0]:.3f} [{rs[1][0]:.3f}, {rs[1][1]:.3f}]"  # noqa: E731
        table.append((r["model"], fmt(r["torch_ratio"]), fmt(r["ort_ratio"]) if "ort_ratio" in r else r.get("onnx", "-"),
                      f"{r['onnx_max_rel_diff']:.1e}" if "onnx_max_rel_diff" in r else "-"))
    header = (f"Compacted at ratio 0.5 (L1 picks), batch {args.batch} at {args.size}x{args.size}, {meta['device']}, "
              f"torch {meta['torch']}, {meta['date']}: forward time of the exact model over the same architecture "
              "with torch's own norms, timed in turns.\n\n")
    text = format_table(table)
    write_report(args.out, "exact-norms", meta, rows, header, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
