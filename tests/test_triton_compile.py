"""The Triton kernel as a GPU would get it, with no GPU: triton compiles ahead of time for a target.

The interpreter, which runs the numerical tests, accepts code that the GPU compiler rejects or turns
slow. So every specialization the backend launches for our test layouts is recorded (the kernel is
not run) and built for Hopper (sm_90) and Ampere (sm_80) in a process without the interpreter; none
may spill registers, and where the launcher promised aligned rows, global loads must be 128-bit and
every store too.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import greg_fast as gf
from greg_fast.backend import triton as triton_backend

from conftest import SHAPES, fake_layer, row_and_column_slices

pytestmark = pytest.mark.skipif(triton_backend.unavailable(torch.device("cpu")) is not None,
                                reason="triton is not installed")
ELEM_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = list(ELEM_NAME)


class Recorder:
    """Stands in for the jitted kernel: keeps each launch's compile-time arguments."""

    def __init__(self):
        self.specs = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.specs.append({**kwargs, "ELEM": str(kwargs["ELEM"])})
        return launch


def record(layers, packed_masks: bool, sgd: bool = True, cross=None):
    """Every launch the backend makes for ``layers``: scores, penalty and (``sgd``) fused SGD, each
    with and without masking and scores, SGD with and without momentum, and a capturable step's
    (mask and skip read from flags; ``cross``: penalties as one launch over rows and columns)."""
    recorder = Recorder()
    kernels = triton_backend._kernels()
    real, kernels._greg_step_kernel = kernels._greg_step_kernel, recorder
    try:
        n = len(layers)
        kept = [torch.rand(l.n_groups) < 0.5 for l in layers]
        if packed_masks:
            kept = [gf.masks.pack_bits(k) for k in kept]
        lam = torch.full((n,), 0.1)
        triton_backend._launch(layers, None, None, None, mode=kernels.MODE_SCORES.value, want_scores=True, mask=False)
        flag = torch.tensor(True)  # a capturable step's: read from memory, always with scores, SGD's skip too
        for mask, scores_too, skip in ((False, (False, True), False), (True, (False, True), False),
                                       (flag, (True,), flag)):
            for want_scores in scores_too:
                triton_backend._launch(layers, kept, lam, lam, mode=kernels.MODE_PENALTY.value, want_scores=want_scores,
                                       mask=mask, cross=None if mask is flag else cross)
                for momentum in (0.0, 0.9) if sgd else ():
                    buffers = [torch.zeros_like(l.weight) if momentum else None for l in layers]
                    triton_backend._launch(layers, kept, lam, lam, mode=kernels.MODE_SGD.value, want_scores=want_scores,
                                           mask=mask, buffers=buffers, hyper=[(0.1, momentum, 1e-4)] * n, skip=skip)
    finally:
        kernels._greg_step_kernel = real
    return recorder.specs


def specs_of(layout, granularity, dtype):
    layers = [fake_layer(s, granularity, dtype, torch.device("cpu"), sp) for s, sp in SHAPES[layout][granularity]]
    return record(layers, packed_masks=granularity == "weight")


def unique(specs):
    return [json.loads(s) for s in sorted({json.dumps(s, sort_keys=True) for s in specs})]


@pytest.mark.parametrize("dtype", DTYPES)
def test_launcher_promises_128_bit_access_only_where_it_holds(dtype):
    vec = 16 // dtype.itemsize
    for granularity in gf.GRANULARITIES:
        assert {s["VEC"] for s in specs_of("odd", granularity, dtype)} == {1}
        assert {s["VEC"] for s in specs_of("aligned", granularity, dtype)} == {vec}, granularity
    # the same aligned shapes at addresses 1 element off a 16-byte boundary
    misaligned = [fake_layer(s, "filter", dtype, torch.device("cpu"), sp, misaligned=True)
                  for s, sp in SHAPES["aligned"]["filter"]]
    assert {s["VEC"] for s in record(misaligned, packed_masks=False)} == {1}


def compile_for_gpu(jobs, tmp_path):
    """[(arch, spec)] -> compile reports, from processes without the interpreter: one per CPU this
    process may use (the compiles are independent), each taking every n-th job from a file (so that
    all start at once)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    n = max(1, min(len(os.sched_getaffinity(0)), 4, len(jobs)))
    procs = []
    for i in range(n):
        path = tmp_path / f"jobs{i}.json"
        path.write_text(json.dumps([{"arch": a, "spec": s} for a, s in jobs[i::n]]))
        with open(path) as stdin:
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("triton_aot.py"))], env=env,
                                          text=True, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    reports = [json.loads(out) for out, _ in outs]
    return [reports[i % n][i // n] for i in range(len(jobs))]


def test_every_launched_kernel_compiles_for_gpus_without_spills_and_with_128_bit_access(tmp_path):
    # every flag combination in fp32; the 16-bit types over the aligned layout (their own conversions)
    specs = unique(s for layout in SHAPES for g in gf.GRANULARITIES for s in specs_of(layout, g, torch.float32))
    specs += unique(s for dtype in DTYPES[1:] for g in gf.GRANULARITIES for s in specs_of("aligned", g, dtype)
                    if s["MASK"] and s["SCORES"])
    # a coupled group's runs of rows and (strided) columns, penalized (a fused step never takes columns)
    specs += unique(s for dtype in DTYPES
                    for s in record(row_and_column_slices(dtype, torch.device("cpu"))[0], False, sgd=False))
    # ... and as one launch (the vectors' values do not matter here, only that they are there)
    for dtype in DTYPES:
        slices = row_and_column_slices(dtype, torch.device("cpu"))[0]
        cross = [(torch.zeros(s.view[2]), torch.ones(s.view[2], dtype=torch.int8), None) if s.axis == 0
                 else (None, None, torch.zeros(s.view[0], dtype=torch.int8)) for s in slices]
        specs += unique(record(slices, False, sgd=False, cross=cross))
    assert any(s["STRIDED"] for s in specs) and any(s["CROSS"] for s in specs)
    assert any(s["MASK"] == 2 and s["SKIP_FLAG"] for s in specs)
    # Hopper for all; Ampere for the aligned ones with every feature on
    jobs = [(90, s) for s in specs] + [(80, s) for s in specs if s["VEC"] > 1 and s["MASK"] and s["SCORES"]]
    for (arch, spec), result in zip(jobs, compile_for_gpu(jobs, tmp_path), strict=True):
        where = f"sm_{arch} {spec}"
        assert result["stack"] == 0, f"register spills ({result['stack']} bytes of stack): {where}"
        if spec["VEC"] > 1:
            assert "ld.global.v4.b32" in result["loads"], f"no 128-bit loads: {where}"
            if spec["MODE"] != 0:  # every store of weights, gradients, momenta is 128-bit
                assert result["stores"] == ["st.global.v4.b32"], f"not only 128-bit stores: {where}"
