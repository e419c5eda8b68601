"""Real data, measured: the published CIFAR-10 ResNet-56 (akamaster/pytorch_resnet_cifar10, a DataParallel
checkpoint with its classifier named ``linear``) through ``greg-fast compare`` on a JPEG copy of
CIFAR-10 at the paper's stage ratios (2.55x fewer FLOPs, single layers as the reference plans them),
methods l1 / greg1 / greg2 / greg1-group (single layers penalized with all their cut removes: BatchNorm
channels and the next conv's columns too), with a protocol that fits 2 CPU cores (a subset and a short schedule: every difference from the
paper's is written into the result). Nothing is committed but the table.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    python bench/cifar_real.py --data-dir /tmp/cifar10-jpeg --weights ../shared/data/resnet56-4bfd9763.th

writes runs/cifar-real/ (the compare run, resumable) and bench/results/cifar10-jpeg-resnet56-<date>.md/.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from greg_fast import timing
from greg_fast.cli import main as greg_fast

PAPER = {"dense": 93.36, "greg1": 93.18, "greg2": 93.36, "speedup": 2.55}  # Wang et al. 2021, Table 2
# the paper's protocol (shared/greg-spec.md) and ours, side by side
PROTOCOL = [
    ("data", "CIFAR-10, 50,000 train / 10,000 test images", "a JPEG copy of CIFAR-10 (lossy), {train} train / {test} test images drawn at random once"),
    ("dense model", "trained by the authors (93.36%)", "akamaster's ResNet-56 (93.62% on the original CIFAR-10), then {pretrain} epoch(s) at lr {lr_pretrain} (cosine) on the subset"),
    ("normalization", "the data's", "ImageNet's (what the weights were trained with)"),
    ("regularization", "lr 1e-3, delta 1e-4 every 10 iterations to 1, 10,000 stabilize (about 110k iterations)", "lr {lr_reg}, delta {delta} every {interval} to {ceiling}, {stabilize} stabilize"),
    ("fine-tune", "120 epochs, lr 0.01/0.001/1e-4 at 0/60/90, batch 128", "{finetune} epochs, lr {lr_ft}, batch {batch}"),
    ("seeds", "not stated", "{seeds}"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="the unpacked cifar10-jpeg/ folder (train/ and test/)")
    p.add_argument("--weights", required=True, help="resnet56-4bfd9763.th")
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="runs/cifar-real")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"))
    a = p.parse_args(argv)
    s = dict(train=a.train, test=a.test, pretrain=1, lr_pretrain=0.01, lr_reg=0.01, delta=0.01, interval=1, ceiling=1,
             stabilize=100, finetune=5, lr_ft="0:0.01,3:0.001", batch=64, seeds=a.seeds)
    flags = ["compare", "--model", "resnet56", "--data", "cifar10", "--data-dir", a.data_dir, "--normalize", "imagenet",
             "--checkpoint", a.weights, "--pretrain-epochs", str(s["pretrain"]), "--lr-pretrain", str(s["lr_pretrain"]),
             "--train-subset", str(a.train), "--test-subset", str(a.test), "--stage-ratios", "0,0.75,0.75,0.32,0",
             "--methods", "l1,greg1,greg2,greg1-group", "--seeds", str(a.seeds), "--batch-size", str(s["batch"]),
             "--lr-reg", str(s["lr_reg"]), "--delta", str(s["delta"]), "--interval", str(s["interval"]),
             "--ceiling", str(s["ceiling"]), "--stabilize", str(s["stabilize"]), "--pick-delta", "1e-3",
             "--pick-ceiling", "1e-2", "--finetune-epochs", str(s["finetune"]), "--lr-ft", s["lr_ft"], "--out", a.out]
    code = greg_fast(flags)
    if code:
        return code
    result = json.loads((Path(a.out) / "compare.json").read_text())
    device = timing.device_name(torch.device("cpu"))
    date = datetime.date.today().isoformat()
    dense = result["dense_test_acc"]
    lines = [f"ResNet-56 on a JPEG copy of CIFAR-10 at the paper's stage ratios [0, 0.75, 0.75, 0.32, 0], {device}, "
             f"torch {torch.__version__}, {date} (`python bench/cifar_real.py`; the run: `{a.out}/compare.md`).", "",
             "| method | this run: test acc % (mean ± std over seeds) | right after pruning % | FLOPs speed-up | paper (dense 93.36%) |",
             "|---|---:|---:|---:|---:|",
             f"| dense | {sum(dense) / len(dense):.2f} ({', '.join(f'{d:.2f}' for d in dense)}) | | 1x | 93.36 |"]
    for r in result["rows"]:
        extra = f", +{r['extra_finetune_epochs']} fine-tune epochs" if r["extra_finetune_epochs"] else ""
        std = f" ± {r['test_acc_std']:.2f}" if r["test_acc_std"] is not None else ""
        lines.append(f"| {r['method']} ({r['protocol']}{extra}) | {r['test_acc']:.2f}{std} | "
                     f"{r['test_acc_after_pruning']:.2f} | {r['flops_reduction']:.2f}x | {PAPER.get(r['method'], '')} |")
    lines += ["", "Protocol, the paper's against this run's:", "", "| | paper | this run |", "|---|---|---|"]
    lines += [f"| {what} | {paper} | {ours.format(**s)} |" for what, paper, ours in PROTOCOL]
    stem = Path(a.results) / f"cifar10-jpeg-resnet56-{date}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"settings": s, "device": device, "compare": result}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
