"""PNG plots of a ``greg-fast prune`` run (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import torch

def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display), imported on first use: the command line
    starts without paying for it (half a second), as a plot is drawn only at the end of a run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    return matplotlib.pyplot


_STAGE_COLORS = {"pretrain": "tab:gray", "regularize": "tab:orange", "finetune": "tab:green"}


def _phase_marks(ax, trace: dict) -> None:
    for iteration, phase in trace["phase_changes"]:
        ax.axvline(iteration, color="k", lw=0.6, ls=":")
        ax.text(iteration, 1.0, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")


def lambda_schedule(trace: dict, path: Path) -> None:
    """λ of selected (solid) and kept (dashed) groups of every regularized layer over iterations."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    it = trace["iteration"].numpy()
    for i, name in enumerate(trace["layers"]):
        line, = ax.plot(it, trace["lambda_selected"][:, i].numpy(), lw=1, label=name if i < 8 else None)
        ax.plot(it, trace["lambda_kept"][:, i].numpy(), lw=0.8, ls="--", color=line.get_color())
    _phase_marks(ax, trace)
    ax.set(xlabel="iteration", ylabel="λ (solid: selected groups, dashed: kept)",
           title="Growing-regularization schedule")
    if len(trace["layers"]) <= 8:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_distribution(trace: dict, path: Path) -> None:
    """Per-group score (mean |w|) of one layer over the regularization, removed vs kept groups."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    it = trace["iteration"].numpy()
    scores = trace["scores"].clamp_min(1e-12).numpy()
    kept = trace["score_kept"]
    for j in range(scores.shape[1]):
        ax.plot(it, scores[:, j], lw=0.7, alpha=0.7, color="tab:blue" if kept[j] else "tab:red")
    ax.plot([], [], color="tab:blue", label="kept groups")
    ax.plot([], [], color="tab:red", label="removed groups")
    _phase_marks(ax, trace)
    ax.set_yscale("log")
    ax.set(xlabel="iteration", ylabel="group score (mean |w|)",
           title=f"Scores of {trace['score_layer']} during regularization")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy(records: list[dict], path: Path, dense_acc: float | None) -> None:
    """Test accuracy at the end of every epoch of every stage."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = 0
    for stage, color in _STAGE_COLORS.items():
        pts = [r for r in records if r.get("type") == "epoch" and r["stage"] == stage]
        if pts:
            xs = list(range(x + 1, x + len(pts) + 1))
            ax.plot(xs, [r["test_acc"] for r in pts], "o-", ms=3, color=color, label=stage)
            x += len(pts)
    if dense_acc is not None:
        ax.axhline(dense_acc, color="k", lw=0.7, ls="--", label=f"dense {dense_acc:.2f}%")
    ax.set(xlabel="epoch (all stages)", ylabel="test accuracy (%)", title="Accuracy over the run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stack_trace(rows: list[dict], meta: dict) -> dict:
    """Turn per-record trace rows into the tensors saved in ``regularization.pt``."""
    return {
        **meta,
        "iteration": torch.tensor([r["iteration"] for r in rows], dtype=torch.int64),
        "lambda_selected": torch.tensor([r["lambda_selected"] for r in rows], dtype=torch.float64),
        "lambda_kept": torch.tensor([r["lambda_kept"] for r in rows], dtype=torch.float64),
        "scores": torch.stack([r["scores"] for r in rows]) if rows else torch.zeros(0, 0),
    }


def compare(records: list[dict], methods: list[str], protocols: tuple, path: Path, dense_acc: list[float]) -> None:
    """``greg-fast compare``: test accuracy per method, one panel per protocol; each seed a point
    (filled: after fine-tuning, hollow: right after pruning), the mean a bar."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.5 * len(protocols), 4), sharey=True, squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        for x, method in enumerate(methods):
            runs = [r for r in records if r["protocol"] == protocol and r["method"] == method]
            if not runs:
                continue
            for key, style in (("test_acc", dict(color="C0")), ("test_acc_after_pruning",
                                                                 dict(facecolors="none", edgecolors="C3"))):
                ys = [r[key] for r in runs]
                xs = [x + 0.08 * (i - (len(ys) - 1) / 2) for i in range(len(ys))]
                ax.scatter(xs, ys, s=18, zorder=3, **style,
                           label={"test_acc": "fine-tuned", "test_acc_after_pruning": "right after pruning"}[key]
                           if x == 0 else None)
                ax.hlines(sum(ys) / len(ys), x - 0.25, x + 0.25, color=style.get("color", "C3"), lw=1.5)
        if dense_acc:
            ax.axhline(sum(dense_acc) / len(dense_acc), color="k", lw=0.7, ls="--", label="dense")
        ax.set_xticks(range(len(methods)), methods)
        ax.set(title=protocol, xlabel="method")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
