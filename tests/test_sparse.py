import pytest
import torch

import greg_fast as gf
from greg_fast import sparse

from conftest import SmallNet


@pytest.mark.parametrize("format", sparse.FORMATS)
@pytest.mark.parametrize("shape", [(7, 3, 3, 3), (13, 11), (1, 1), (5, 4097), (9,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_matches_the_reference_and_round_trips_exactly(format, shape, dtype):
    if format == "csr" and len(shape) == 1:
        shape = (1, 9)
    w = torch.randn(shape).to(dtype)
    mask = torch.rand(shape) < 0.3
    packed = sparse.pack(w, mask, format)
    ref = sparse.pack_reference(w, mask, format)
    assert packed.keys() == ref.keys()
    for k in packed:
        if isinstance(packed[k], torch.Tensor):
            assert torch.equal(packed[k], ref[k]), k
        else:
            assert packed[k] == ref[k]
    assert torch.equal(sparse.unpack(packed), w * mask)


def test_default_mask_is_the_nonzero_entries_and_bytes_shrink():
    w = torch.randn(64, 64, 3, 3)
    w[torch.rand_like(w) < 0.827] = 0  # the reference's unstructured ResNet-50 ratio
    dense = w.numel() * 4
    for format in sparse.FORMATS:
        packed = sparse.pack(w, format=format)
        assert torch.equal(sparse.unpack(packed), w)
        assert sparse.nbytes(packed) < dense
    assert sparse.nbytes(sparse.pack(w, format="bitmap")) < 0.25 * dense


def test_pack_model_packs_every_planned_layer(tmp_path):
    net = SmallNet()
    plan = gf.plan(net, 0.8, granularity="weight", example_inputs=torch.zeros(1, 3, 6, 6))
    masks = {l.name: torch.rand(l.n_groups) > 0.8 for l in plan.layers}
    gf.apply_masks(net, masks, plan)
    out = sparse.pack_model(net, masks, plan, "csr")
    assert set(out["layers"]) == {l.name for l in plan.layers}
    assert out["bytes_packed"] < out["bytes_dense"]
    torch.save(out, tmp_path / "sparse.pt")
    back = torch.load(tmp_path / "sparse.pt", weights_only=True)
    for layer in plan.layers:
        assert torch.equal(sparse.unpack(back["layers"][layer.name]), layer.weight.detach())


def test_bad_arguments():
    with pytest.raises(ValueError, match="format must be one of"):
        sparse.pack(torch.randn(3, 3), format="coo")
    with pytest.raises(ValueError, match="bool tensor of the weight's shape"):
        sparse.pack(torch.randn(3, 3), torch.ones(9, dtype=torch.bool))


def test_corrupt_csr_is_refused():
    packed = sparse.pack(torch.randn(4, 6), torch.rand(4, 6) > 0.5, "csr")
    packed["col_indices"] = packed["col_indices"] + 6
    with pytest.raises(ValueError, match="corrupt CSR pack"):
        sparse.unpack(packed)


def test_a_corrupt_bitmap_pack_is_refused():
    w = torch.randn(4, 5)
    packed = sparse.pack_reference(w, torch.rand(4, 5) > 0.5, "bitmap")
    short = dict(packed, bits=packed["bits"][:1])
    with pytest.raises(ValueError, match="corrupt bitmap pack: 1 bytes"):
        sparse.unpack(short)
    extra = dict(packed, values=torch.cat([packed["values"], torch.ones(1)]))
    with pytest.raises(ValueError, match="corrupt bitmap pack: the bits keep"):
        sparse.unpack(extra)
