"""The compacted model where it will run: ONNX export (``torch.onnx.export``, the dynamo exporter, a
batch axis of any size), checked in ONNX Runtime against PyTorch, and the dense and the pruned
model timed in ONNX Runtime in alternation (:func:`greg_fast.timing.speedup`).

``pip install 'greg-fast[onnx]'`` (onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .timing import speedup

TOLERANCE = 1e-4  # ONNX Runtime against PyTorch, relative to the output's largest entry (float32 kernels)


def _runtime():
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({err}): "
                          "pip install 'greg-fast[onnx]'") from None
    return onnxruntime


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session on ``path``, with ``threads`` (default: torch's) intra-op threads."""
    ort = _runtime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(sess, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, *,
                batch_sizes: Sequence[int] = (1, 8)) -> dict:
    """Write ``model`` (eval mode, on the CPU) as ONNX to ``path`` with a batch axis of any size, and
    check ONNX Runtime's output against PyTorch's at ``batch_sizes`` (random inputs shaped like
    ``example``). The file appears only once it is written and checked. Returns the largest
    difference relative to the output's largest entry. Raises ``RuntimeError`` naming what failed."""
    _runtime()
    model = model.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        x = example[:1].cpu().expand(2, *example.shape[1:]).contiguous()
        batch = torch.export.Dim("batch", min=1, max=4096)
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
            program.save(tmp)
        except Exception as err:
            raise RuntimeError(f"torch.onnx.export failed on {type(model).__name__}: {type(err).__name__}: "
                               f"{str(err).strip()[:500]}") from err
        sess, worst, g = session(tmp), 0.0, torch.Generator().manual_seed(0)
        for b in batch_sizes:
            xb = torch.randn((b, *example.shape[1:]), generator=g)
            with torch.no_grad():
                ref = model(xb)
            got = _run(sess, xb)
            if got.shape != ref.shape:
                raise RuntimeError(f"ONNX Runtime gives an output of shape {tuple(got.shape)} at batch {b}, "
                                   f"PyTorch {tuple(ref.shape)}")
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        if not worst <= TOLERANCE:
            raise RuntimeError(f"ONNX Runtime's output differs from PyTorch's by {worst:.2e} of its largest "
                               f"entry (more than {TOLERANCE:g}): the exported graph computes something else")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": str(path), "max_rel_diff": worst, "bytes": path.stat().st_size}


def onnx_speedup(dense: str | Path, pruned: str | Path, example: torch.Tensor, batch_sizes: Sequence[int] = (1, 8),
                 seconds: float = 10.0, threads: int | None = None) -> dict:
    """Dense and pruned ONNX files timed in ONNX Runtime in alternation at each batch size (random
    inputs shaped like ``example``; ``seconds`` split over the batch sizes, at least 5 rounds each):
    ``{"batch1": {dense_ms, pruned_ms, speedup, speedup_p10_p90, rounds}, ..., "threads": n}``."""
    sessions = [session(dense, threads), session(pruned, threads)]
    out = {}
    for b in batch_sizes:
        x = torch.randn((b, *example.shape[1:]), generator=torch.Generator().manual_seed(b))
        d, p = (lambda s=s: _run(s, x) for s in sessions)
        out[f"batch{b}"] = speedup(d, p, torch.device("cpu"), seconds / len(batch_sizes))
    out["threads"] = threads or torch.get_num_threads()
    return out


def check_exportable(model: nn.Module, example: torch.Tensor) -> None:
    """Raise before any training where ``model`` cannot be exported (the packages, or the exporter on
    the dense architecture, which has the pruned one's ops)."""
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "check.onnx", example, batch_sizes=(1,))


def export_and_measure(pruned: nn.Module, dense: nn.Module, example: torch.Tensor, path: str | Path,
                       batch_sizes: Sequence[int] = (1, 8), seconds: float = 20.0) -> dict:
    """``pruned`` written as ONNX to ``path`` (checked), and its ONNX Runtime latency against ``dense``'s
    (exported to a temporary folder) at ``batch_sizes``: what ``greg-fast export`` reports."""
    written = export_onnx(pruned, path, example, batch_sizes=batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(dense, Path(tmp) / "dense.onnx", example, batch_sizes=batch_sizes[:1])
        timed = onnx_speedup(Path(tmp) / "dense.onnx", path, example, batch_sizes, seconds)
    return {**written, "input": list(example.shape[1:]), "latency": timed}


def format_latency(result: dict) -> str:
    """The latency rows of :func:`export_and_measure`'s result, one line per batch size."""
    lines = []
    for key, t in result["latency"].items():
        if key.startswith("batch"):
            lines.append(f"ONNX Runtime ({result['latency']['threads']} threads), batch {key[5:]}: dense "
                         f"{t['dense_ms']:.3g} ms, pruned {t['pruned_ms']:.3g} ms: {t['speedup']:.3g}x "
                         f"({t['speedup_p10_p90'][0]:.3g}-{t['speedup_p10_p90'][1]:.3g}, {t['rounds']} rounds)")
    return "\n".join(lines)
