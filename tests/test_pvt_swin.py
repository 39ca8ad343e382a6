"""Swin and PVT v1 (issue 21 part 4), each also with LaViT's less attention.

Properties, not shapes: the shifted-window mask against a brute-force "same window of the shifted partition"
of every token pair; a Swin block against plain masked attention over the whole map written out here; the
relative position index as a bijection of offsets; PVT's spatial-reduction attention against plain attention
and against the paper's Reshape + Linear form; parity with timm on deterministic weights (tests/fixtures,
made by tests/fixtures/make_swin_golden.py); parameter counts against ARCHITECTURES.md §6.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from conftest import load_golden, rel_err
from vitkit.bench import count_macs
from vitkit.interpret import capture_attention
from vitkit.interpret.geometry import ImageQuery
from vitkit.layers.attention import use_fused_attn
from vitkit.layers.less_attention import LessAttention, VanillaAttention
from vitkit.models._checkpoint import load_state_dict_into
from vitkit.models.swin import SwinBlock, SwinTransformer, WindowAttention, relative_position_index, shifted_window_mask

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# ARCHITECTURES.md §6: Swin [timm-results] (1000 classes), PVT v1 the paper's table [unverified there]
TABLE_PARAMS_M = {
    "swin_tiny_patch4_window7_224": 28.29,
    "swin_small_patch4_window7_224": 49.61,
    "swin_base_patch4_window7_224": 87.77,
    "pvt_tiny": 13.2,
    "pvt_small": 24.5,
    "pvt_medium": 44.2,
    "pvt_large": 61.4,
}


@pytest.mark.parametrize("name", sorted(TABLE_PARAMS_M))
def test_parameter_count_within_one_percent_of_the_table(name):
    with torch.device("meta"):
        model = vitkit.create_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n / TABLE_PARAMS_M[name] - 1) < 0.01, (name, n)


@pytest.mark.parametrize(
    "name,gmacs",
    [
        ("swin_tiny_patch4_window7_224", 4.51),
        pytest.param("swin_small_patch4_window7_224", 8.77, marks=pytest.mark.slow),
        pytest.param("swin_base_patch4_window7_224", 15.47, marks=pytest.mark.slow),
    ],
)
def test_swin_macs_within_one_percent_of_timm(name, gmacs):
    """[timm-bench] GMACs at 224 px (ARCHITECTURES.md §6); ours count matmuls and convs only (0.3-0.4% lower)."""
    with torch.device("meta"):
        model = vitkit.create_model(name)
    assert abs(count_macs(model) / 1e9 / gmacs - 1) < 0.01


# ---- Swin: relative positions, the shift mask, window attention ----------------------------------------------


@pytest.mark.parametrize("window", [(7, 7), (3, 5)])
def test_relative_position_index_is_a_function_of_the_offset_only(window):
    idx = relative_position_index(window)
    wh, ww = window
    pos = [(y, x) for y in range(wh) for x in range(ww)]
    seen: dict[tuple[int, int], int] = {}
    for i, (yi, xi) in enumerate(pos):
        for j, (yj, xj) in enumerate(pos):
            off = (yi - yj, xi - xj)
            assert seen.setdefault(off, int(idx[i, j])) == int(idx[i, j]), off  # translation: same offset, same row
    # one table row per offset, every row used: a bijection onto range((2Wh - 1)(2Ww - 1))
    assert sorted(seen.values()) == list(range((2 * wh - 1) * (2 * ww - 1)))
    # opposite offsets sit symmetrically about the centre row (offset 0)
    centre = seen[(0, 0)]
    assert torch.equal(idx + idx.T, torch.full_like(idx, 2 * centre))
    assert (idx.diagonal() == centre).all()


def _displaced_window(p: int, size: int, window: int, shift: int) -> int:
    """Which window of the shifted partition of the original map holds the token at shifted position ``p``."""
    r = (p + shift) % size  # where the token sat before the cyclic shift
    return (r - shift) // window  # windows of the original map start at shift, shift + window, ...; -1: the first part


@pytest.mark.parametrize(
    "grid,window,shift", [((8, 8), (4, 4), (2, 2)), ((8, 12), (4, 4), (2, 2)), ((6, 9), (3, 3), (1, 1))]
)
def test_shift_mask_blocks_exactly_the_cross_window_pairs(grid, window, shift):
    mask = shifted_window_mask(grid, window, shift)
    H, W = grid
    nw = W // window[1]
    n = window[0] * window[1]
    assert mask.shape == ((H // window[0]) * nw, n, n)
    for w in range(mask.shape[0]):
        wy, wx = divmod(w, nw)
        cells = [(wy * window[0] + a, wx * window[1] + b) for a in range(window[0]) for b in range(window[1])]
        for i, (yi, xi) in enumerate(cells):
            for j, (yj, xj) in enumerate(cells):
                same = _displaced_window(yi, H, window[0], shift[0]) == _displaced_window(
                    yj, H, window[0], shift[0]
                ) and _displaced_window(xi, W, window[1], shift[1]) == _displaced_window(xj, W, window[1], shift[1])
                assert float(mask[w, i, j]) == (0.0 if same else -100.0), (w, (yi, xi), (yj, xj))
    assert (mask != 0).any()  # the last window row/column mixes sub-windows


def _plain_probs(blk: SwinBlock, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over every token of the map ``y`` (B, H, W, C), restricted by a mask to the pairs that share a
    window of the (shifted) partition of the original map, with the bias looked up from each pair's offset.
    Returns the probabilities (B, heads, HW, HW) and the values (B, heads, HW, d)."""
    B, H, W, C = y.shape
    attn: WindowAttention = blk.attn
    heads, d = attn.num_heads, attn.head_dim
    (wh, ww), (sh, sw) = blk.window, blk.shift
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    win = ((ys - sh) // wh) * 1000 + (xs - sw) // ww  # the window of each token in the original map
    allowed = win[:, None] == win[None, :]
    table_row = (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)
    bias = attn.relative_position_bias_table[table_row.clamp(0, attn.relative_position_bias_table.shape[0] - 1)]
    q, k, v = attn.qkv(y.reshape(B, H * W, C)).reshape(B, H * W, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * d**-0.5 + bias.permute(2, 0, 1)
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1), v


def _plain_block_reference(blk: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The whole block with :func:`_plain_probs` as its attention."""
    B, H, W, C = x.shape
    probs, v = _plain_probs(blk, blk.norm1(x))
    x = x + blk.attn.proj((probs @ v).transpose(1, 2).reshape(B, H * W, C)).reshape(B, H, W, C)
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("shift", [(0, 0), (2, 2)])
@pytest.mark.parametrize("fused", [True, False])
def test_window_attention_block_equals_plain_attention_restricted_to_each_window(shift, fused):
    torch.manual_seed(0)
    blk = SwinBlock(32, 4, (8, 12), (4, 4), shift, 2.0, True, 0.0, 0.0, False, {}).eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()  # a bias large enough to matter
    x = torch.randn(2, 8, 12, 32)
    with torch.no_grad(), use_fused_attn(fused):
        ours, _, _ = blk(x)
        ref = _plain_block_reference(blk, x)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_attention_geometry_places_each_window_row_where_its_keys_are_in_the_image():
    """What ``vitkit explain`` paints: the query token's attention over the stage's token grid, which must be the
    row of the plain whole-map reference (zeros outside the query's shifted window)."""
    torch.manual_seed(0)
    blk = SwinBlock(32, 4, (8, 12), (4, 4), (2, 2), 2.0, True, 0.0, 0.0, False, {}).eval()
    x = torch.randn(2, 8, 12, 32)
    with torch.no_grad(), capture_attention(blk) as records:
        blk(x)
        ref, _ = _plain_probs(blk, blk.norm1(x))
    (record,) = records
    for ty, tx in [(0, 0), (7, 11), (1, 10), (6, 1), (3, 5)]:  # token cells; 4 x 4 pixels each on a 32 x 48 image
        cells = blk.attn.attention_geometry(record, ImageQuery((ty * 4 + 1, tx * 4 + 2), (32, 48)))
        torch.testing.assert_close(cells, ref[:, :, ty * 12 + tx].reshape(2, 4, 8, 12), atol=1e-6, rtol=1e-5)


def test_a_map_no_larger_than_the_window_is_one_unshifted_window():
    blk = SwinBlock(16, 2, (4, 4), (7, 7), (3, 3), 2.0, True, 0.0, 0.0, False, {})
    assert blk.window == (4, 4) and blk.shift == (0, 0) and blk.attn_mask is None
    assert blk.attn.relative_position_bias_table.shape == (7 * 7, 2)


# ---- Swin: parity with timm, checkpoint layouts ------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture,fused",
    [
        ("swin_tiny_patch4_window7_224", True),
        pytest.param("swin_tiny_patch4_window7_224", False, marks=pytest.mark.slow),
        ("swin_tiny_patch4_window7_224_64px", True),
        ("swin_tiny_patch4_window7_224_64px", False),
    ],
)
def test_swin_matches_timm_on_deterministic_weights(fixture, fused):
    """timm 1.0.31's outputs (fp32, CPU) for the fixture's weights; timm's own fp32 vs fp64 differ by < 1e-6, so
    1e-4 of the largest value is a difference in the computation, not in rounding. The 64 px fixture pads the
    16 x 16 and 8 x 8 grids to the window after the shift, as timm does."""
    fill = load_golden()
    spec = json.loads((FIXTURES / f"{fixture}.json").read_text())
    assert spec["fp64_rel_err"] < 1e-5
    sd = {k: torch.from_numpy(v) for k, v in fill.deterministic_state_dict(spec["state_dict"]).items()}
    model = vitkit.create_model(spec["model"], num_classes=spec["num_classes"], **spec["create_kwargs"]).eval()
    load_state_dict_into(model, sd, vitkit.get_model_entry(spec["model"]).checkpoint_filter, source=fixture)
    x = torch.from_numpy(fill.golden_input(*spec["input_shape"]))
    ref = np.load(FIXTURES / f"{fixture}.npz")
    with torch.no_grad(), use_fused_attn(fused):
        feats = model.forward_features(x)
        ours = dict(
            features=feats[:, :: spec["feature_stride"]],
            pre_logits=model.forward_head(feats, pre_logits=True),
            logits=model.forward_head(feats),
        )
    for key, val in ours.items():
        assert tuple(val.shape) == ref[key].shape, key
        assert rel_err(val.numpy(), ref[key]) < 1e-4, (key, rel_err(val.numpy(), ref[key]))


def _small_swin(**kwargs) -> SwinTransformer:
    torch.manual_seed(0)
    args = dict(img_size=32, embed_dim=16, depths=(4, 2), num_heads=(2, 2), window_size=4, num_classes=5)
    return SwinTransformer(**{**args, **kwargs}).eval()


def test_original_microsoft_layout_loads_through_the_checkpoint_filter():
    """The original layout puts each patch merging at the end of the stage before and names the head ``head``;
    it also stores the position index and masks. Written here from timm's layout; it loads to the same model."""
    model = _small_swin()
    sd = model.state_dict()
    old = {}
    for k, v in sd.items():
        if k.startswith("layers.1.downsample"):
            k = k.replace("layers.1.downsample", "layers.0.downsample")
        old[k.replace("head.fc.", "head.")] = v
    old["layers.0.blocks.0.attn.relative_position_index"] = relative_position_index((4, 4))
    old["layers.0.blocks.1.attn_mask"] = model.layers[0].blocks[1].attn_mask
    other = _small_swin()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    entry = vitkit.get_model_entry("swin_tiny_patch4_window7_224")
    load_state_dict_into(other, {"model": old}, entry.checkpoint_filter, source="original layout")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)


# ---- Swin with less attention ----------------------------------------------------------------------------------


def _probs_by_block(model: SwinTransformer, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    out, hooks = {}, []
    for i, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            hooks.append(blk.attn.attn_probs.register_forward_hook(lambda m, a, o, key=(i, j): out.__setitem__(key, o)))
    with torch.no_grad(), use_fused_attn(False):
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_swin_less_attention_blocks_transform_the_scores_of_the_last_block_with_their_shift():
    model = _small_swin(less_attention=True)
    # stage 0 (8 x 8 grid, windows of 4): W, SW computed, then W, SW transformed; stage 1 (one 4 x 4 window)
    assert model.num_va == (2, 1)
    assert [b.less for b in model.layers[0].blocks] == [False, False, True, True]
    assert model.layers[0].source == [None, None, 0, 1] and model.layers[1].source == [None, 0]
    assert all(isinstance(b.attn, LessAttention) for s in model.layers for b in s.blocks if b.less)
    x = torch.randn(2, 3, 32, 32)
    probs = _probs_by_block(model, x)
    # identity Theta/Psi at init: an LA block attends exactly as the block it reads, under the same mask
    for i, stage in enumerate(model.layers):
        for j, src in enumerate(stage.source):
            if src is not None:
                torch.testing.assert_close(probs[(i, j)], probs[(i, src)], atol=1e-6, rtol=1e-5)
    # learned transforms change the attention, but never across the shifted windows' sub-window boundaries
    with torch.no_grad():
        for blk in model.layers[0].blocks[2:]:
            blk.attn.theta.add_(torch.randn_like(blk.attn.theta))
            blk.attn.psi.add_(torch.randn_like(blk.attn.psi))
    probs = _probs_by_block(model, x)
    assert not torch.allclose(probs[(0, 3)], probs[(0, 1)], atol=1e-3)
    blocked = model.layers[0].blocks[3].attn_mask.repeat(2, 1, 1)[:, None] != 0  # (B * nW, 1, N, N)
    assert blocked.any() and probs[(0, 3)].masked_select(blocked).max() < 1e-30


def test_swin_less_attention_needs_a_vanilla_block_per_shift_and_trains_with_the_dp_loss():
    with pytest.raises(ValueError, match=r"num_va=1 leaves block 1 \(shift \(2, 2\)\) a less-attention block"):
        _small_swin(less_attention=True, num_va=(1, 1))
    model = _small_swin(less_attention=True).train()
    out = model(torch.randn(2, 3, 32, 32))
    losses = model.extra_losses()
    assert set(losses) == {"dp"} and len(model.la_record) == 3
    (out.square().mean() + losses["dp"]).backward()
    assert model.layers[0].blocks[2].attn.theta.grad.abs().sum() > 0
    assert _small_swin().train().extra_losses() == {}  # plain Swin: no LA blocks, no DP loss


# ---- PVT: spatial-reduction attention, composition with less attention ----------------------------------------


def _plain_attention(x_q, x_kv, attn: VanillaAttention) -> torch.Tensor:
    B, N, C = x_q.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.q(x_q).reshape(B, N, h, d).transpose(1, 2)
    k, v = attn.kv(x_kv).reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4)
    out = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, -1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, N, C))


def test_sra_with_sr_ratio_1_is_plain_attention():
    torch.manual_seed(0)
    attn = VanillaAttention(40, 5, sr_ratio=1).eval()
    x = torch.randn(2, 48, 40)
    with torch.no_grad():
        out, scores, probs = attn(x, (6, 8))
        torch.testing.assert_close(out, _plain_attention(x, x, attn), atol=1e-5, rtol=1e-5)
    assert scores.shape == probs.shape == (2, 5, 48, 48)


def test_sra_reduces_keys_by_the_papers_reshape_and_linear():
    """SR(x) = LN(Reshape(x, R) W^S): each R x R patch of tokens flattened to R^2 C values, one Linear."""
    torch.manual_seed(0)
    R, C, (h, w) = 2, 16, (6, 8)
    attn = VanillaAttention(C, 2, sr_ratio=R).eval()
    x = torch.randn(2, h * w, C)
    patches = x.reshape(2, h // R, R, w // R, R, C).permute(0, 1, 3, 2, 4, 5).reshape(2, -1, R * R * C)
    w_s = attn.sr.weight.permute(2, 3, 1, 0).reshape(R * R * C, C)  # (r1, r2, c_in) -> c_out
    reduced = attn.norm(patches @ w_s + attn.sr.bias)
    with torch.no_grad():
        out, scores, _ = attn(x, (h, w))
        torch.testing.assert_close(out, _plain_attention(x, reduced, attn), atol=1e-5, rtol=1e-5)
    assert scores.shape[-1] == (h // R) * (w // R)


def test_pvt_is_lavit_with_vanilla_attention_and_with_less_attention_is_lavit_tiny():
    pvt = vitkit.create_model("pvt_tiny", img_size=64).eval()
    assert all(not b.less for s in pvt.stages for b in s.blocks) and all(s.inherit is None for s in pvt.stages)
    torch.manual_seed(0)
    lavit = vitkit.create_model("lavit_tiny", img_size=64).eval()
    pvt_la = vitkit.create_model("pvt_tiny", img_size=64, less_attention=True).eval()
    sd = lavit.state_dict()
    assert {k: v.shape for k, v in pvt_la.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    pvt_la.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pvt_la(x), lavit(x), atol=0, rtol=0)
    # stage 3 at 64 px: 4 x 4 tokens, keys reduced 2x per side: the LA layer maps 16 queries x 4 reduced keys
    la = pvt_la.stages[2].blocks[1].attn
    assert isinstance(la, LessAttention) and la.psi.shape[-1] == 16 and la.theta.shape[-1] == 4


def test_pvt_swin_refuse_sizes_their_stages_cannot_take():
    with pytest.raises(ValueError, match=r"^swin_tiny_patch4_window7_224: img_size=100: .* = 32, got 100x100"):
        vitkit.create_model("swin_tiny_patch4_window7_224", img_size=100)
    model = _small_swin()
    with pytest.raises(ValueError, match=r"expected input size 32x32 \(img_size\), got 64x64"):
        model(torch.randn(1, 3, 64, 64))
