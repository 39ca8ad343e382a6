"""ViT's position-embedding study (appendix D.4): none / learned 1-D / learned 2-D / relative, added at the input,
at every block or at every block shared; what each variant computes, checked as properties."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.layers import use_fused_attn
from vitkit.layers.rel_pos import RelPosAttention, relative_index_1d
from vitkit.models.vit import checkpoint_filter_fn

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
VARIANTS = [("none", "input"), ("relative", "input")]
VARIANTS += [(pe, ev) for pe in ("learn1d", "learn2d") for ev in ("input", "every", "every_shared")]


def _vit(pos_embed="learn1d", every="input", seed=0, **kw):
    torch.manual_seed(seed)
    return vitkit.create_model(
        "vit_tiny_patch16_224", **{**SMALL, **kw}, pos_embed=pos_embed, pos_embed_every_layer=every
    ).eval()


def _x(size=32, batch=2, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, size, size)


def test_bad_values_are_refused_with_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"^vit_tiny_patch16_224: pos_embed must be one of .*'learn2d'.*got 'abs'"):
        vitkit.create_model("vit_tiny_patch16_224", pos_embed="abs")
    with pytest.raises(ValueError, match=r"pos_embed_every_layer must be one of .*'every_shared'.*got 'all'"):
        vitkit.create_model("vit_tiny_patch16_224", pos_embed_every_layer="all")
    with pytest.raises(ValueError, match=r"pos_embed_every_layer='every' needs pos_embed 'learn1d' or 'learn2d'.*"):
        vitkit.create_model("vit_tiny_patch16_224", pos_embed="relative", pos_embed_every_layer="every")
    with pytest.raises(ValueError, match=r"even embed_dim .* got 33"):
        vitkit.create_model("vit_tiny_patch16_224", pos_embed="learn2d", embed_dim=33, num_heads=3)


def test_default_keeps_the_timm_layout():
    """The default builds the same parameters as before the study (timm's names and shapes), nothing added."""
    with torch.device("meta"):
        m = vitkit.create_model("vit_tiny_patch16_224")
    pos = {k: tuple(v.shape) for k, v in m.state_dict().items() if "pos" in k or "rel" in k}
    assert pos == {"pos_embed": (1, 197, 192)}
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}


def _block_inputs(model, x):
    """Each block's input tokens and output tokens, from hooks."""
    ins, outs = [], []
    hooks = [b.register_forward_pre_hook(lambda m, a: ins.append(a[0])) for b in model.blocks]
    hooks += [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return ins, outs


@pytest.mark.parametrize("pe", ["learn1d", "learn2d"])
def test_every_layer_adds_its_own_or_the_shared_embedding_before_each_block(pe):
    x = _x()
    grid = (4, 4)
    for every in ("every", "every_shared"):
        model = _vit(pe, every, class_token=True)
        zeros = torch.zeros(1, 17, 32)
        added = [model._add_pos(zeros, i, grid)[0] for i in range(3)]
        ins, outs = _block_inputs(model, x)
        for i in (1, 2):  # block i's input = block i-1's output + that block's embedding
            torch.testing.assert_close(ins[i] - outs[i - 1], added[i].expand_as(ins[i]), rtol=0, atol=1e-5)
        distinct = not torch.equal(added[1], added[2])
        assert distinct == (every == "every"), every
        assert torch.equal(added[0], added[2]) == (every == "every_shared")


def test_learn2d_is_x_and_y_halves_concatenated_and_leaves_the_class_token():
    model = _vit("learn2d", class_token=True)
    ex, ey = model.pos_embed_x[0], model.pos_embed_y[0]  # (W, D/2), (H, D/2)
    pe = model._add_pos(torch.zeros(1, 17, 32), 0, (4, 4))[0]
    assert torch.equal(pe[0], torch.zeros(32))  # the class token gets no position embedding (our choice)
    for y in range(4):
        for x in range(4):
            assert torch.equal(pe[1 + y * 4 + x], torch.cat([ex[x], ey[y]]))


def _shuffle_patches(img: torch.Tensor, perm: torch.Tensor, p: int = 8) -> torch.Tensor:
    b, c, h, w = img.shape
    t = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c, p, p)
    t = t[:, perm].reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(b, c, h, w)


@pytest.mark.parametrize("pe", ["none", "learn1d", "learn2d", "relative"])
def test_only_no_position_embedding_is_blind_to_where_patches_are(pe):
    """Mean-pooled, no class token: without position information the model sees a bag of patches."""
    model = _vit(pe, global_pool="avg", class_token=False)
    with torch.no_grad():  # position parameters as large as the content's, so a difference shows above rounding
        for n, p in model.named_parameters():
            if "pos_embed" in n or "rel_table" in n:
                p.mul_(50)
    x = _x()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(x), model(_shuffle_patches(x, perm))
    assert torch.allclose(a, b, atol=1e-5) == (pe == "none"), (a - b).abs().max()


def test_relative_logits_match_the_offset_lookup_and_the_class_token_rule():
    torch.manual_seed(0)
    attn = RelPosAttention(16, num_heads=2, max_patches=6, num_prefix_tokens=1)
    q = torch.randn(2, 2, 7, 8)
    got = attn.relative_logits(q)
    r, extra = attn.rel_table, 2 * 6 - 1
    for i in range(7):
        for j in range(7):
            if i and j:
                row = (j - 1) - (i - 1) + 5  # key minus query offset, shifted
            else:
                row = extra + (0 if not i and j else 1 if i and not j else 2)
            torch.testing.assert_close(got[:, :, i, j], (q[:, :, i] * attn.scale * r[:, row]).sum(-1))
    # a longer sequence clips offsets to the table's range (+-5 here)
    idx = relative_index_1d(9, 6, 0)
    assert idx[0, 8] == 10 and idx[8, 0] == 0 and idx[3, 5] == 7


def test_relative_attention_is_translation_equivariant_along_the_sequence():
    """Content shifted by s places along a longer sequence: its logits among themselves move with it unchanged
    (they depend on the offset j - i only, not on where the pair sits)."""
    torch.manual_seed(0)
    attn = RelPosAttention(16, num_heads=2, max_patches=12, num_prefix_tokens=0).eval()
    with torch.no_grad():
        attn.rel_table.mul_(50)  # position logits of the size of the content logits
    content = torch.randn(1, 6, 16)
    s = 3
    a = torch.cat([content, torch.zeros(1, 6, 16)], dim=1)  # content at 0..5, zeros at 6..11
    b = torch.cat([torch.zeros(1, s, 16), content, torch.zeros(1, 6 - s, 16)], dim=1)  # content at 3..8

    def logits(x):
        q = attn.qkv(x).reshape(1, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)[0]
        return attn.relative_logits(q)[0]

    with torch.no_grad():
        la, lb = logits(a), logits(b)
        torch.testing.assert_close(lb[:, s : s + 6, s : s + 6], la[:, :6, :6])  # depends on j - i only
        assert not torch.allclose(la[:, 0, 1], la[:, 0, 2])  # ... and on it: positions are seen


@pytest.mark.parametrize("pe,every", VARIANTS)
def test_fused_and_eager_paths_agree_and_intermediates_match(pe, every):
    model = _vit(pe, every, class_token=True)
    x = _x()
    with torch.no_grad():
        with use_fused_attn(True):
            fused = model.forward_features(x)
        with use_fused_attn(False):
            eager = model.forward_features(x)
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, fused, rtol=1e-5, atol=1e-5)
    assert len(inter) == 3 and torch.allclose(model.norm(inter[-1]), final, atol=1e-5)


@pytest.mark.parametrize("pe,every", [("learn1d", "every"), ("learn2d", "input"), ("relative", "input")])
def test_another_resolution_by_resampling_equals_a_model_built_for_it(pe, every):
    """A 32 px model run at 48 px (dynamic_img_size) computes what a 48 px model loaded from its weights does:
    the checkpoint filter resamples 1-D embeddings (per layer), the X/Y tables, and the relative tables."""
    small = _vit(pe, every, class_token=True, dynamic_img_size=True)
    torch.manual_seed(5)
    big = vitkit.create_model("vit_tiny_patch16_224", **{**SMALL, "img_size": 48}, pos_embed=pe,
                              pos_embed_every_layer=every).eval()  # fmt: skip
    sd = checkpoint_filter_fn(dict(small.state_dict()), big)
    big.load_state_dict(sd)
    x = _x(48)
    with torch.no_grad():
        torch.testing.assert_close(big(x), small(x), rtol=1e-5, atol=1e-5)
    if pe == "learn2d":
        assert big.pos_embed_x.shape == (1, 6, 16)


def test_relative_and_2d_embeddings_train():
    """Every new parameter gets a gradient (relative tables in every block, the X and Y tables per layer)."""
    for pe, every in (("relative", "input"), ("learn2d", "every")):
        model = _vit(pe, every, class_token=True).train()
        model(_x()).square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing
        assert {"pos_embed_x", "pos_embed_y"} <= model.no_weight_decay() or pe == "relative"
        assert "blocks.0.attn.rel_table" in model.no_weight_decay() or pe != "relative"
