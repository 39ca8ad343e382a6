"""Captured attention painted onto the image: each family's query/key layout, checked by its locality rule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import input_size_for, small_model
from vitkit.interpret import attention_to_image, capture_attention
from vitkit.layers import Attention, HaloAttention

FAMILIES = ["vit_tiny_patch16_224", "nest_tiny", "mobilevit_xxs", "mobilevitv2_050", "halonet26t", "lavit_tiny"]


def _capture(name):
    model = small_model(name).eval()
    x = torch.randn(1, *input_size_for(name))
    with torch.no_grad(), capture_attention(model) as records:
        model(x)
    return model, tuple(x.shape[-2:]), records


def _cells(heat: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Sample a painted (B, heads, H, W) map at the centre of each cell of ``grid``: (B, heads, gh, gw)."""
    H, W = heat.shape[-2:]
    ys = ((torch.arange(grid[0]) + 0.5) * H / grid[0]).long()
    xs = ((torch.arange(grid[1]) + 0.5) * W / grid[1]).long()
    return heat[..., ys[:, None], xs[None, :]]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_layer_maps_to_a_distribution_over_image_cells(name):
    model, size, records = _capture(name)
    H, W = size
    for r in records:
        for q in [(0, 0), (H // 2, W // 3), (H - 1, W - 1)]:
            heat = attention_to_image(model, r, size, q)
            assert heat.shape[0] == 1 and heat.shape[-2:] == size, (r.layer, heat.shape)
            assert (heat >= 0).all() and heat.amax() > 0
            assert heat.amax() <= 1 + 1e-5
    with pytest.raises(ValueError, match="outside"):
        attention_to_image(model, records[0], size, (H, 0))


def test_vit_map_is_the_query_tokens_row_on_the_patch_grid():
    model, size, records = _capture("vit_tiny_patch16_224")
    gh, gw = size[0] // 16, size[1] // 16
    r = records[-1]
    q = (size[0] - 1, 20)  # last patch row, second patch column
    tok = (gh - 1) * gw + 1
    heat = attention_to_image(model, r, size, q)
    expected = r.probs[:, :, 1 + tok, 1:].reshape(1, -1, gh, gw)
    torch.testing.assert_close(_cells(heat, (gh, gw)), expected)
    torch.testing.assert_close(heat.sum((-2, -1)) / 256 + r.probs[:, :, 1 + tok, 0], torch.ones(1, heat.shape[1]))


def test_nest_map_stays_in_the_query_block_and_sums_to_one():
    model, size, records = _capture("nest_tiny")
    q = (size[0] - 3, 2)
    for r in records:
        level = model.get_submodule(r.layer.split(".transformer_encoder")[0])
        (gh, gw), (bh, bw) = level.grid, level.block
        cells = _cells(attention_to_image(model, r, size, q), (gh * bh, gw * bw))
        torch.testing.assert_close(cells.sum((-2, -1)), torch.ones(cells.shape[:2]))
        by, bx = q[0] * gh * bh // size[0] // bh, q[1] * gw * bw // size[1] // bw
        inside = torch.zeros(gh * bh, gw * bw, dtype=torch.bool)
        inside[by * bh : (by + 1) * bh, bx * bw : (bx + 1) * bw] = True
        assert (cells[..., ~inside] == 0).all(), r.layer  # local attention: nothing outside the block


def test_halo_map_is_the_query_blocks_window():
    model, size, records = _capture("halonet26t")
    for r in records:
        layer = r.module
        assert isinstance(layer, HaloAttention)
        Hf, Wf = r.input_shape[-2:]
        b, h = layer.block_size, layer.halo_size
        for fy, fx in [(0, 0), (Hf // 2, Wf // 2), (Hf - 1, Wf - 1)]:
            q = (fy * size[0] // Hf, fx * size[1] // Wf)
            cells = _cells(attention_to_image(model, r, size, q), (Hf, Wf))
            by, bx = fy // b, fx // b
            inside = torch.zeros(Hf, Wf, dtype=torch.bool)
            inside[max(0, by * b - h) : by * b + b + h, max(0, bx * b - h) : bx * b + b + h] = True
            assert (cells[..., ~inside] == 0).all(), (r.layer, fy, fx)
            mass = cells.sum((-2, -1))
            assert (mass <= 1 + 1e-5).all() and (mass > 0).all()
            window_in_map = by * b - h >= 0 and bx * b - h >= 0 and by * b + b + h <= Hf and bx * b + b + h <= Wf
            if window_in_map:  # no zero-padding keys: all the mass is on the image
                torch.testing.assert_close(mass, torch.ones_like(mass))


@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevitv2_050"])
def test_mobilevit_map_keeps_the_query_offset_in_every_patch(name):
    model, size, records = _capture(name)
    for r in records:
        n = r.probs.shape[-1]
        block = next(m for k, m in model.named_modules() if r.layer.startswith(k + ".") and hasattr(m, "patch"))
        ph, pw = block.patch
        nh = math.isqrt(n)  # square test images
        grid = (nh * ph, nh * pw)
        q = (size[0] // 2 + 1, size[1] // 3)
        fy, fx = q[0] * grid[0] // size[0], q[1] * grid[1] // size[1]
        cells = _cells(attention_to_image(model, r, size, q), grid)
        same = torch.zeros(grid, dtype=torch.bool)
        same[fy % ph :: ph, fx % pw :: pw] = True
        assert (cells[..., ~same] == 0).all(), r.layer
        torch.testing.assert_close(cells.sum((-2, -1)), torch.ones(cells.shape[:2]))


def test_lavit_keys_on_the_reduced_grid_cover_the_image():
    model, size, records = _capture("lavit_tiny")
    for r in records:
        heat = attention_to_image(model, r, size, (3, 5))
        n_keys = r.probs.shape[-1]
        side = math.isqrt(n_keys)
        cells = _cells(heat, (side, side))
        torch.testing.assert_close(cells.sum((-2, -1)), torch.ones(cells.shape[:2]), atol=1e-5, rtol=0)


def test_image_distance_agrees_with_token_distance_for_vit():
    from vitkit.interpret import mean_attention_distance, mean_attention_distance_image

    model, size, records = _capture("vit_tiny_patch16_224")
    grid = (size[0] // 16, size[1] // 16)
    for r in records:
        tokens = mean_attention_distance(r.probs, grid, 16, model.num_prefix_tokens)
        image = mean_attention_distance_image(model, r, size, queries=grid[0])  # one query per token
        # each key token counts with its pixels' mean distance instead of its centre's: within half a token
        assert (image - tokens).abs().max() < 8, (r.layer, image, tokens)


def test_image_distance_of_halo_attention_stays_within_the_window():
    from vitkit.interpret import mean_attention_distance_image

    model, size, records = _capture("halonet26t")
    for r in records:
        stride = size[0] / r.input_shape[-2]
        reach = (r.module.block_size + r.module.halo_size) * stride * 2**0.5  # farthest key of a window
        d = mean_attention_distance_image(model, r, size, queries=4)
        assert d.shape == (r.module.num_heads,) and (d > 0).all() and (d < reach).all(), (r.layer, d, reach)


class _Tokens(torch.nn.Module):
    """A toy model: token attention over a 4x6 map, with no geometry of its own."""

    def __init__(self):
        super().__init__()
        self.attn = Attention(8, num_heads=2)

    def forward(self, x):
        return self.attn(x.flatten(2).transpose(1, 2))  # (B, C, 4, 6) -> tokens (B, 24, C)


class _Corner(_Tokens):
    """A toy family whose one method says: every key lies in the image's top-left quarter."""

    def attention_geometry(self, record, query):
        cells = record.probs.new_zeros(*record.probs.shape[:2], 2, 2)  # (B, heads, 2, 2) over the image
        cells[:, :, 0, 0] = record.probs[:, :, query.cell((4, 6))[0]].sum(-1)
        return cells


@pytest.mark.parametrize("cls", [_Corner, _Tokens])
def test_a_new_model_describes_its_geometry_with_one_method_and_token_attention_needs_none(cls):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad(), capture_attention(model) as records:
        model(torch.randn(1, 8, 4, 6))
    heat = attention_to_image(model, records[0], (8, 12), (7, 11))
    if cls is _Corner:  # its 2x2 cells over the 8x12 image: all the mass in the top-left 4x6 pixels
        expected = torch.zeros(1, 2, 8, 12)
        expected[..., :4, :6] = 1
    else:  # plain token attention on the 4x6 grid: the last token's row, each token 2x2 pixels
        expected = records[0].probs[:, :, -1].reshape(1, 2, 4, 6).repeat_interleave(2, -2).repeat_interleave(2, -1)
    torch.testing.assert_close(heat, expected)


def test_a_model_wrapped_in_a_task_model_keeps_its_geometry():
    """The innermost owner describes the layout: a ViT inside a wrapper still drops its class token."""
    model = small_model("vit_tiny_patch16_224").eval()
    wrapper = torch.nn.Sequential(model)
    x = torch.randn(1, *input_size_for("vit_tiny_patch16_224"))
    with torch.no_grad(), capture_attention(wrapper) as records:
        wrapper(x)
    size = tuple(x.shape[-2:])
    assert records[0].layer == "0.blocks.0.attn"
    direct = attention_to_image(model, dataclasses.replace(records[0], layer="blocks.0.attn"), size, (20, 40))
    torch.testing.assert_close(attention_to_image(wrapper, records[0], size, (20, 40)), direct, rtol=0, atol=0)
