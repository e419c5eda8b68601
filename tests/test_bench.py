"""The benchmark plumbing (no timing assertions: speed is judged in bench/, not in tests)."""
import json

import pytest

import torch

from greg_fast import bench, timing
from greg_fast.cli import main


def test_reference_style_adds_the_same_penalty_as_eager_on_the_selected_filters():
    work = bench.workload("resnet20", torch.device("cpu"))
    before = [w.grad.clone() for w in work.weights]
    bench.reference_style(work)()
    for w, g in zip(work.weights, before):
        n = w.shape[0] // 2
        torch.testing.assert_close(w.grad[:n], g[:n] + 1e-4 * w[:n].detach())
        torch.testing.assert_close(w.grad[n:], g[n:])


def test_bench_command_writes_records_with_bandwidth_fractions(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "time_call", lambda fn, device, rounds=20, warmup=3: (fn(), 1e-3)[1])
    assert main(["bench", "--models", "resnet20", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    records = json.loads(path.read_text())
    names = {r["provider"] for r in records}
    assert {"reference", "eager", "foreach", "compile", "cpp", "torch_sgd", "greg_fused_sgd"} <= names
    assert "triton" not in names  # GPU only
    work = bench.workload("resnet20", torch.device("cpu"))
    numel = sum(w.numel() for w in work.weights)
    assert work.penalized * 2 == numel  # every conv of the plan halves its filters
    for r in records:  # penalty: r w, r grad, w grad of the selected half; fused SGD: 5 passes over all
        assert r["bytes"] == (5 * numel if "sgd" in r["provider"] else 3 * work.penalized) * 4
        assert r["copy_fraction"] == pytest.approx(r["bytes"] / r["seconds"] / (r["copy_gb_per_s"] * 1e9), rel=1e-12)
        assert r["device"] and r["date"]
        baseline = {"penalty": "x_reference", "sgd": "x_torch_sgd"}[r["kind"]]
        assert r[baseline] == 1.0  # time_call is stubbed: every provider takes 1 ms
    assert "of copy" in capsys.readouterr().out


def test_triton_provider_adds_what_eager_adds():
    """The GPU set's own provider, run here under the interpreter on a small model."""
    grads = {}
    for name in ("eager", "triton"):
        work = bench.workload("resnet20", torch.device("cpu"))
        bench.provider(name, work)()
        grads[name] = [w.grad for w in work.weights]
    for got, want in zip(grads["triton"], grads["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_cpu_round_is_one_call():
    calls = []
    assert timing.calls_per_round(lambda: calls.append(1), torch.device("cpu")) == 1 and not calls
    timing.repeated(lambda: calls.append(1), 3, torch.device("cpu"))()
    assert len(calls) == 3
