"""Dense vs pruned in ONNX Runtime: torchvision's ResNet-18 and ResNet-50 and timm models, compacted at
ratio 0.5 (coupled groups, L1 picks), exported with ``greg_fast.export`` (checked against PyTorch)
and timed in alternation at batch 1 and 8 on the CPU.

    python bench/onnx_speed.py [--models resnet18,resnet50,efficientnet_b0] [--seconds 30]

writes bench/results/onnx-speed-<device>-<date>.json and .md.
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
from greg_fast import models, timing
from greg_fast.export import export_onnx, onnx_speedup
from greg_fast.plan import count_flops
from greg_fast.table import format_table

from zoo import build, write_report


def row(name: str, batch_sizes, seconds: float) -> dict:
    model = build(name, timm_zoo=name not in models.names()).eval()  # torchvision's where greg_fast's zoo has it
    x = torch.randn(1, 3, 224, 224)
    plan = gf.plan(model, 0.5, example_inputs=x)
    masks = gf.GrowingReg(torch.optim.SGD(model.parameters(), lr=0.0), plan, method="l1").masks()
    small, small_plan = copy.deepcopy((model, plan))
    gf.compact(small, masks, small_plan)
    out = {"model": name, "flops_ratio": count_flops(model, (x,))[1] / count_flops(small, (x,))[1]}
    with tempfile.TemporaryDirectory() as tmp:
        checks = [export_onnx(m, Path(tmp) / f"{k}.onnx", x, batch_sizes=batch_sizes) for k, m in
                  (("dense", model), ("pruned", small))]
        out["max_rel_diff"] = max(c["max_rel_diff"] for c in checks)
        out["latency"] = onnx_speedup(Path(tmp) / "dense.onnx", Path(tmp) / "pruned.onnx", x, batch_sizes, seconds)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet50,efficientnet_b0,convnext_atto")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--seconds", type=float, default=30.0, help="per model, split over the batch sizes")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    for name in args.models.split(","):
        rows.append(row(name, batch_sizes, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    cpu = torch.device("cpu")
    meta = {"device": timing.device_name(cpu), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "threads": torch.get_num_threads()}
    import onnxruntime
    meta["onnxruntime"] = onnxruntime.__version__
    table = [("model", "FLOPs", *(f"batch {b}: dense / pruned ms, speed-up [p10, p90]" for b in batch_sizes),
              "ORT vs PyTorch (max rel)")]
    for r in rows:
        cells = []
        for b in batch_sizes:
            t = r["latency"][f"batch{b}"]
            cells.append(f"{t['dense_ms']:.3g} / {t['pruned_ms']:.3g}, {t['speedup']:.2f}x "
                         f"[{t['speedup_p10_p90'][0]:.2f}, {t['speedup_p10_p90'][1]:.2f}]")
        table.append((r["model"], f"{r['flops_ratio']:.2f}x fewer", *cells, f"{r['max_rel_diff']:.1e}"))
    header = (f"ONNX Runtime {meta['onnxruntime']} (CPU, {meta['threads']} threads), {meta['device']}, torch "
              f"{meta['torch']}, {meta['date']}: compacted at ratio 0.5 (coupled groups, L1 picks), 224x224, dense and "
              "pruned timed in alternation (median, and the 10th-90th percentile of the per-round speed-up).\n\n")
    text = format_table(table)
    write_report(args.out, "onnx-speed", meta, rows, header, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
