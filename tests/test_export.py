"""ONNX export of compacted models (greg_fast.export, greg-fast export, prune --export onnx): checked in
ONNX Runtime against PyTorch, exact norms included, and a failing export leaves no file."""
import json

import pytest
import torch
import torch.nn as nn

import greg_fast as gf
from greg_fast.cli import main
from greg_fast.export import check_exportable, export_onnx, onnx_speedup

from test_attention import TinyViT
from test_groups import exact_pair
from test_cli import TINY
from test_user_models import randomize

pytest.importorskip("onnxruntime", reason="onnx, onnxscript and onnxruntime are test dependencies")


@pytest.mark.parametrize("build, x", [(lambda: gf.models.create("resnet20"), torch.randn(1, 3, 32, 32)),
                                      (lambda: TinyViT(), torch.randn(1, 3, 8, 8))])  # exact LayerNorms, sdpa scale
def test_a_compacted_model_exports_and_onnx_runtime_computes_what_pytorch_does(tmp_path, build, x):
    model = randomize(build()).eval()
    plan = gf.plan(model, 0.5, example_inputs=x)
    _, small = exact_pair(model, plan, 0.5)
    result = export_onnx(small, tmp_path / "m.onnx", x, batch_sizes=(1, 3))
    assert result["max_rel_diff"] < 1e-5 and (tmp_path / "m.onnx").stat().st_size == result["bytes"]
    timed = onnx_speedup(tmp_path / "m.onnx", tmp_path / "m.onnx", x, batch_sizes=(2,), seconds=0.2)
    assert timed["batch2"]["rounds"] >= 5 and timed["batch2"]["pruned_ms"] > 0


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # a branch on a value: torch.export cannot capture it


def test_a_failing_export_is_named_and_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="torch.onnx.export failed on DataDependent"):
        check_exportable(DataDependent(), torch.randn(1, 3, 4, 4))
    with pytest.raises(RuntimeError):
        export_onnx(DataDependent(), tmp_path / "x.onnx", torch.randn(1, 3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_prune_exports_at_the_end_and_export_measures_a_run_again(tmp_path, capsys):
    out = tmp_path / "run"
    args = [a if a != "1" else "0" for a in TINY]  # no epochs: the export is what is tested
    args[args.index("--pretrain-epochs") + 1] = "1"
    assert main(["prune", "--method", "l1", *args, "--out", str(out), "--export", "onnx",
                 "--latency-batch-sizes", "1,4", "--latency-seconds", "1"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["onnx"]["max_rel_diff"] < 1e-5 and set(s["onnx"]["latency"]) == {"batch1", "batch4", "threads"}
    assert (out / "model.onnx").is_file() and s["onnx"]["input"] == [1, 8, 8]
    assert main(["export", str(out), "--out", str(tmp_path / "again.onnx"), "--batch-sizes", "2", "--seconds", "0.5"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert "batch2" in again["latency"] and "ONNX Runtime (" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "no such file" in capsys.readouterr().err
