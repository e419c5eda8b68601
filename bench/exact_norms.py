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
import io
import json
from pathlib import Path

import torch

import greg_fast as gf
from greg_fast import timing
from greg_fast.table import format_table

from zoo import build


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


def onnx_session(model, x):
    import onnxruntime as ort
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="convnext_atto,vit_tiny_patch16_224,convnextv2_atto,poolformer_s12")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
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
            sessions = {k: onnx_session(m, x) for k, m in pair.items()}
            feed = x.numpy()
            runs = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for k, s in sessions.items()}
            ort_seconds = timing.alternate(runs, args.rounds, cpu)
            with torch.no_grad():
                ref = pair["exact"](x)
            got = torch.from_numpy(runs["exact"]()[0])
            row.update(ort_ratio=timing.ratio_spread(ort_seconds["exact"], ort_seconds["approximate"]),
                       onnx_max_rel_diff=float((got - ref).abs().max() / ref.abs().max()))
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
    text = format_table(table)
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-").lower()
    stem = Path(args.out) / f"exact-norms-{slug}-{meta['date']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (f"Compacted at ratio 0.5 (L1 picks), batch {args.batch} at {args.size}x{args.size}, {meta['device']}, "
              f"torch {meta['torch']}, {meta['date']}: forward time of the exact model over the same architecture "
              "with torch's own norms, timed in turns.\n\n")
    stem.with_suffix(".md").write_text(header + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
