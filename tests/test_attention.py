"""Attention and the residual stream around it, on small transformers written here (timm's and
torchvision's run in test_timm_zoo and below): heads cut as dims or whole, stored widths, the class
token and position embedding cut with the stream, LayerNorm and the fused attention's scale kept
at the masked model's count, and growing regularization over heads on every backend."""
import copy
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import greg_fast as gf
from greg_fast.backend import backends

from test_compact import assert_same_outputs
from test_groups import exact_pair, one_step
from test_user_models import randomize


class Attention(nn.Module):
    def __init__(self, dim, heads, fused):
        super().__init__()
        self.num_heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.scale = self.head_dim ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)  # derives its scale from the head size
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class TinyViT(nn.Module):
    def __init__(self, fused=True, dim=16, heads=4, depth=2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), attn=Attention(dim, heads, fused),
                                                  norm2=nn.LayerNorm(dim), fc1=nn.Linear(dim, 2 * dim),
                                                  fc2=nn.Linear(2 * dim, dim))))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for b in self.blocks:
            x = x + b["attn"](b["norm1"](x))
            x = x + b["fc2"](F.gelu(b["fc1"](b["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


X = torch.randn(3, 3, 8, 8)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("heads", ["dims", "whole"])
def test_attention_heads_stream_and_norms_compact_to_what_the_masked_model_computes(fused, heads, tmp_path):
    model = randomize(TinyViT(fused)).eval()
    plan = gf.plan(model, 0.5, example_inputs=X[:1], heads=heads)
    assert list(plan.excluded) == ["head"]  # everything but the classifier's outputs
    stream, attn = plan["patch"], plan["blocks.0.attn.qkv"]
    assert {k.tensor for k in stream.members if k.module == ""} == {"cls_token", "pos_embed"}
    assert attn.n_groups == 4  # 4 heads, or 4 dims in every head
    for ratio in (0.3, 0.7):
        masked, small = exact_pair(model, plan, ratio)
        assert_same_outputs(masked, small, X)
        a = small.blocks[0]["attn"]
        assert a.qkv.out_features == 3 * a.num_heads * a.head_dim
        assert (a.head_dim if heads == "whole" else a.num_heads) == 4  # the other one follows the cut
        assert small.pos_embed.shape[-1] == small.patch.out_channels == small.blocks[0]["norm1"].normalized_shape[0]
        gf.save(small, tmp_path / "m.pt")
        assert_same_outputs(small, gf.load(tmp_path / "m.pt", model=TinyViT(fused)).eval(), X)
        assert_same_outputs(small, torch.export.export(small, (X,)).module(), X)


class SeparateProjections(nn.Module):
    """Hugging Face's attention (ViT, DeiT, Swin, DINOv2 in transformers 5): q, k and v from their
    own projections, viewed as ``(*shape, -1, self.head_dim)``: the head count is inferred, and the
    scale is passed as a number."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.head_dim, self.scaling = dim // heads, (dim // heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


@pytest.mark.parametrize("heads", ["dims", "whole"])
def test_an_inferred_head_count_beside_a_stored_head_size_is_followed(heads):
    """dims: every head loses the same dims of q, k and v (one ``head_dim`` gives all three), which
    ``head_dim`` follows; whole: the inferred axis loses heads, a head's q, k and v together."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Linear(6, 16), SeparateProjections(), nn.Linear(16, 3))).eval()
    x = torch.randn(2, 5, 6)
    plan = gf.plan(model, 0.5, example_inputs=x[:1], heads=heads)
    assert list(plan.excluded) == ["2"]  # the output layer alone
    group = plan["1.q_proj"]
    assert {k.module for k in group.members if k.role == "filter"} == {"1.q_proj", "1.k_proj", "1.v_proj"}
    assert group.n_groups == 4  # 4 dims of every head, or 4 heads
    for ratio in (0.3, 0.7):
        masked, small = exact_pair(model, plan, ratio)
        assert_same_outputs(masked, small, x)
        a = small[1]
        assert (a.head_dim == 4) == (heads == "whole") and a.q_proj.out_features < 16
        assert a.v_proj.out_features == a.q_proj.out_features


def test_the_fused_attention_keeps_its_original_scale_after_the_head_dims_are_cut():
    model = randomize(TinyViT(fused=True)).eval()
    plan = gf.plan(model, 0.5, example_inputs=X[:1])
    masked, small = exact_pair(model, plan, 0.5)
    (count,) = [c for c in small.blocks[0]["attn"].greg_counts if c.op == "scaled_dot_product_attention"]
    assert count.width == 4 and count.kept == small.blocks[0]["attn"].head_dim < 4
    small.blocks[0]["attn"].greg_counts = []  # without it, the scale follows the smaller head size
    with torch.no_grad():
        assert not torch.allclose(masked(X), small(X), atol=1e-4)


@pytest.mark.parametrize("heads", ["dims", "whole"])
def test_growing_regularization_penalizes_a_head_as_one_group_on_every_backend(heads):
    model = randomize(TinyViT()).train()
    planned = (model, gf.plan(model, 0.5, example_inputs=X[:1], heads=heads))
    ref = one_step(planned, X, "eager", "filters", False)
    for backend in ("cpp", "triton"):
        if backends(torch.device("cpu"))[backend] != "available":
            continue
        params, masks, scores = one_step(planned, X, backend, "filters", False)
        for a, b in zip(ref[0], params):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(masks[k], ref[1][k]) for k in masks)
        for k in scores:
            torch.testing.assert_close(scores[k], ref[2][k], rtol=1e-5, atol=1e-7)
    layer = planned[1]["blocks.0.attn.qkv"]
    assert ref[2][layer.name].shape == (4,)  # one score per head (or per dim of every head)


def test_torchvision_vision_transformer_plans_and_compacts_exactly():
    torch.manual_seed(0)
    model = randomize(torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                            hidden_dim=16, mlp_dim=32, num_classes=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    plan = gf.plan(model, 0.5, example_inputs=x[:1])
    assert list(plan.excluded) == ["heads.head"]  # the stream and the attention too: they share embed_dim
    attention = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in (0, 1)]
    assert plan.ties == {a: ("conv_proj", Fraction(1, 2)) for a in attention}  # 2 heads: 2 stream channels per dim
    assert [plan[a].n_prune for a in attention] == [4, 4] and plan["conv_proj"].n_prune == 8
    for ratio in (0.3, 0.7):
        masked, small = exact_pair(model, plan, ratio)
        assert_same_outputs(masked, small, x)
        mha = small.encoder.layers[0].self_attention
        assert mha.embed_dim == small.hidden_dim == mha.head_dim * 2 < 16


def test_tied_groups_keep_their_proportion_under_a_budget_and_a_mask_that_breaks_it_is_refused():
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=3).eval()
    x = torch.randn(1, 3, 16, 16)
    plan = gf.plan(model, example_inputs=x, target={"flops": 0.6}, round_to=2)
    for name, (root, r) in plan.ties.items():
        assert plan[name].n_prune == plan[root].n_prune * r and plan[root].n_prune % 4 == 0
    assert plan.cost()["flops_after"] <= 0.6 * plan.cost()["flops_before"]
    with pytest.raises(ValueError, match="proportion"):
        plan.set_counts({"conv_proj": 4, "encoder.layers.encoder_layer_0.self_attention": 1})
    masks = {l.name: torch.ones(l.n_groups, dtype=torch.bool) for l in plan.layers}
    masks["conv_proj"][:4] = False  # the stream alone: MultiheadAttention's embed_dim would disagree
    with pytest.raises(ValueError, match="embed_dim` two different widths"):
        gf.compact(*copy.deepcopy((model, masks, plan)))
